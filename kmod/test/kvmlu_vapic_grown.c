// SPDX-License-Identifier: GPL-2.0
/*
 * kvmlu_vapic_grown.ko, for tests only: a version 3 vAPIC whose per-vCPU
 * command grew past the running kvmlu.ko's dispatch buffer, as a successor
 * that adds fields to struct kvmlu_vapic_vcpu without bumping
 * KVMLU_KAPI_VERSION would. Its own copy of union kvmlu_ucmd_buffer grows
 * with it, so its build passes the size checks of KVMLU_IOCTL_OP; the
 * running kvmlu.ko must refuse its dispatch table when it loads.
 */
/* As kvmlu_vapic_core.c defines it, which the header below must not precede. */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/types.h>

/* Rename the header's union so that this file can define a larger one. */
#define kvmlu_ucmd_buffer kvmlu_ucmd_buffer_base
#include "../kvmlu_internal.h"
#undef kvmlu_ucmd_buffer

/* The base's buffer, and 64 bytes more than it can hold. */
struct kvmlu_vapic_vcpu_grown {
	struct kvmlu_vapic_vcpu vcpu;
	__u8 later[sizeof(union kvmlu_ucmd_buffer_base) -
		   sizeof(struct kvmlu_vapic_vcpu) + 64];
};

union kvmlu_ucmd_buffer {
	union kvmlu_ucmd_buffer_base base;
	struct kvmlu_vapic_vcpu_grown vapic_vcpu_grown;
};

#define KVMLU_VAPIC_VCPU_ARG	struct kvmlu_vapic_vcpu_grown
#define KVMLU_VAPIC_VCPU_LAST	vcpu.moved
#define KVMLU_VAPIC_VERSION 3
#include "../kvmlu_vapic_core.c"
