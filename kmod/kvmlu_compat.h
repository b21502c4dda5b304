/* SPDX-License-Identifier: GPL-2.0 */
/*
 * kvmlu builds against Debian 12's 6.1 kernel and against newer ones. The few
 * interfaces that changed between them are wrapped here; kmod/Kbuild detects
 * which form the kernel's headers declare.
 */
#ifndef _KVMLU_COMPAT_H
#define _KVMLU_COMPAT_H

#include <linux/eventfd.h>
#include <linux/mm.h>

/*
 * Add @n to an eventfd's counter and wake its waiters; returns what was
 * added. Kernels whose eventfd_signal() adds one at a time get @n calls
 * (and their counter saturates without saying so).
 */
static inline u64 kvmlu_eventfd_signal(struct eventfd_ctx *ctx, u64 n)
{
#ifdef KVMLU_HAVE_EVENTFD_SIGNAL_COUNT
	return eventfd_signal(ctx, n);
#else
	u64 i;

	for (i = 0; i < n; i++)
		eventfd_signal(ctx);
	return n;
#endif
}

/* Set and clear VMA flags from an mmap() handler. */
static inline void kvmlu_vma_flags(struct vm_area_struct *vma,
				   vm_flags_t set, vm_flags_t clear)
{
#ifdef KVMLU_HAVE_VM_FLAGS_MOD
	vm_flags_mod(vma, set, clear);
#else
	vma->vm_flags = (vma->vm_flags | set) & ~clear;
#endif
}

#endif /* _KVMLU_COMPAT_H */
