// SPDX-License-Identifier: GPL-2.0
/*
 * kvmlu_vapic_kapi_skew.ko, for tests only: a version 3 vAPIC that says it
 * was built for the next in-kernel interface version (KVMLU_KAPI_VERSION + 1)
 * while its code is this tree's. The running kvmlu.ko has the current one:
 * the module must refuse to load.
 */
/* As kvmlu_vapic_core.c defines it, which the header below must not precede. */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include "../kvmlu_internal.h"

enum { kvmlu_test_base_kapi = KVMLU_KAPI_VERSION };
#undef KVMLU_KAPI_VERSION
#define KVMLU_KAPI_VERSION (kvmlu_test_base_kapi + 1)

#define KVMLU_VAPIC_VERSION 3
#include "../kvmlu_vapic_core.c"
