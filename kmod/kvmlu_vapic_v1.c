// SPDX-License-Identifier: GPL-2.0
/* kvmlu_vapic_v1.ko: the vAPIC at save format version 1. */
#define KVMLU_VAPIC_VERSION 1
#include "kvmlu_vapic_core.c"
