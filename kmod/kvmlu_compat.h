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

/* Add @n to an eventfd's counter and wake its waiters. */
static inline void kvmlu_eventfd_signal(struct eventfd_ctx *ctx,
					unsigned int n)
{
#ifdef KVMLU_HAVE_EVENTFD_SIGNAL_COUNT
	eventfd_signal(ctx, n);
#else
	while (n--)
		eventfd_signal(ctx);
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
