// SPDX-License-Identifier: GPL-2.0
/* kvmlu_vapic_v2.ko: the vAPIC at save format version 2. */
#define KVMLU_VAPIC_VERSION 2
#include "kvmlu_vapic_core.c"
