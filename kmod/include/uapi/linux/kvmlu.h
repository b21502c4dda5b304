/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * kvmlu: posted-interrupt descriptors that outlive the VMM that created them.
 *
 * This header is the single source of truth for the kvmlu uAPI: the kernel
 * modules, the Python control plane (through cffi) and the QEMU patches all
 * include it.
 */
#ifndef _UAPI_LINUX_KVMLU_H
#define _UAPI_LINUX_KVMLU_H

#include <linux/ioctl.h>
#include <linux/types.h>

/**
 * DOC: General ioctl format
 *
 * Every ioctl takes a pointer to a structure whose first field is a __u32
 * @size: the number of bytes userspace passes, normally sizeof() of the
 * structure as userspace knows it. The size travels in the structure, not in
 * the ioctl number, so a structure can grow at its end:
 *
 *  - a @size below the size of the structure as first released (up to and
 *    including its last mandatory field) is refused with EINVAL;
 *  - bytes beyond the structure as the kernel knows it must be zero, or the
 *    call fails with E2BIG;
 *  - output fields are copied back up to the smaller of @size and the
 *    kernel's structure.
 *
 * The second field is a __u32 @flags. Unknown flags are refused with EINVAL,
 * and so is any non-zero field documented "Must be zero". A failing call
 * changes nothing.
 *
 * Every object is a file descriptor (an anonymous inode, created O_CLOEXEC):
 * /dev/kvmlu creates descriptor tables, a table creates IRQ bindings, and an
 * object lives as long as a file descriptor, a mapping or another object
 * refers to it (a binding keeps its table).
 *
 * Errors, as errno values:
 *
 *  - ENOTTY: the command is unknown, or not one of this file's commands
 *    (for example a table command issued on /dev/kvmlu).
 *  - EFAULT: the argument pointer, or a buffer it names, is not readable or
 *    writable. A command that writes fields back (any with an Output field)
 *    makes sure its whole structure is writable ordinary memory before it
 *    acts, so its EFAULT means it did nothing; and if that memory stalls
 *    (userfaultfd, a slow file), the command waits before acting, holding
 *    no lock. A buffer the structure names (the vAPIC blob, the session
 *    entries) is written after the command's locks are dropped; a command
 *    that fails there had changed nothing either.
 *  - EINVAL: @size below the minimum, unknown @flags, a non-zero reserved
 *    field, a value outside its defined set, or a file descriptor of the
 *    wrong type (for example one that is not an eventfd, or an
 *    EFD_SEMAPHORE eventfd given to KVMLU_TABLE_BIND); a vAPIC blob whose
 *    records hold a vector 0..31.
 *  - E2BIG: @size beyond the kernel's structure with non-zero bytes there.
 *  - ERANGE: a vCPU index at or beyond the table's vCPU count, a vector or
 *    notification vector outside 32..255, a vCPU count outside
 *    1..KVMLU_MAX_VCPUS, or a vAPIC blob for another vCPU count.
 *  - EBADF: a file descriptor field that names no open file.
 *  - EBUSY: KVMLU_TABLE_BIND of an eventfd that already has a consumer
 *    which takes its signals first: a kvmlu binding (of this table or any
 *    other) or a KVM irqfd; the session is held by an open session file
 *    descriptor.
 *  - EEXIST: the caller has a session of that name already, or an object
 *    under that token exists.
 *  - ENOENT: no session of that name that the caller may retrieve (another
 *    owner's, unless the caller administers it, counts as none), or no
 *    object under that token.
 *  - ENOTUNIQ: the caller has no session of that name, and the sessions of
 *    several owners it administers have it (see "Session owners").
 *  - EOPNOTSUPP: a file of a type a session cannot preserve.
 *  - EALREADY: the file is preserved already, in this session or another.
 *  - EDQUOT: the caller has as many sessions as kvmlu.ko's
 *    max_sessions_per_owner parameter allows (see "Sessions").
 *  - ESTALE: the session was finished.
 *  - ENOSPC: a vAPIC blob does not fit the buffer given; the session
 *    preserves as many files as the max_objects_per_session parameter
 *    allows.
 *  - EBADMSG, EPROTONOSUPPORT: see "vAPIC modules" below.
 *  - ENOMEM, EMFILE, ENFILE: the kernel could not allocate the object or a
 *    file descriptor for it.
 *
 * mmap() of a table returns EACCES for a writable or executable mapping,
 * EINVAL for a private mapping or one that extends beyond the table; a
 * mapping cannot be made writable or executable later (EACCES). A kernel
 * that refuses executable mappings of every anonymous-inode file itself
 * returns EPERM for an executable one before kvmlu is asked (Linux 7.3
 * does; 6.1 and 6.12 do not).
 */

/* Not used by any other subsystem; see ioctl-number.rst. */
#define KVMLU_IOCTL_TYPE	0xB9

/* Commands on /dev/kvmlu. */
enum {
	KVMLU_CMD_BASE = 0x00,
	KVMLU_CMD_QUERY = KVMLU_CMD_BASE,
	KVMLU_CMD_CREATE_TABLE = 0x01,
	KVMLU_CMD_CREATE_SESSION = 0x02,
	KVMLU_CMD_RETRIEVE_SESSION = 0x03,
	KVMLU_CMD_LIST_SESSIONS = 0x04,
};

/* Commands on a table file descriptor. */
enum {
	KVMLU_TABLE_CMD_BASE = 0x20,
	KVMLU_CMD_TABLE_SET_NOTIFY = KVMLU_TABLE_CMD_BASE,
	KVMLU_CMD_TABLE_SET_SN = 0x21,
	KVMLU_CMD_TABLE_PEEK = 0x22,
	KVMLU_CMD_TABLE_FETCH = 0x23,
	KVMLU_CMD_TABLE_POST = 0x24,
	KVMLU_CMD_TABLE_BIND = 0x25,
	KVMLU_CMD_TABLE_INFO = 0x26,
};

/* Commands on an IRQ binding file descriptor. */
enum {
	KVMLU_BINDING_CMD_BASE = 0x40,
	KVMLU_CMD_BINDING_INFO = KVMLU_BINDING_CMD_BASE,
};

/* Commands on a session file descriptor. */
enum {
	KVMLU_SESSION_CMD_BASE = 0x60,
	KVMLU_CMD_SESSION_PRESERVE = KVMLU_SESSION_CMD_BASE,
	KVMLU_CMD_SESSION_RETRIEVE = 0x61,
	KVMLU_CMD_SESSION_UNPRESERVE = 0x62,
	KVMLU_CMD_SESSION_FINISH = 0x63,
};

/* The version of this interface; QUERY reports it. */
#define KVMLU_API_VERSION	1

/* The largest vCPU count a table may have. */
#define KVMLU_MAX_VCPUS		1024

/* Vectors 0..31 are exceptions and are never posted. */
#define KVMLU_VECTOR_MIN	32
#define KVMLU_VECTOR_MAX	255
#define KVMLU_NR_VECTORS	256

/**
 * struct kvmlu_pi_desc - a posted-interrupt descriptor, as a table holds it
 * @pir: Posted Interrupt Requests: bit N of the 256-bit field (bit N % 64 of
 *	@pir[N / 64]) is set while vector N is pending.
 * @control: Outstanding Notification (ON, bit 0), Suppress Notification
 *	(SN, bit 1), Notification Vector (NV, bits 16..23) and Notification
 *	Destination (NDST, bits 32..63). All other bits are zero.
 * @reserved: Zero.
 *
 * The layout is that of the Intel VT-d posted-interrupt descriptor: 64 bytes,
 * and in a table each descriptor is 64-byte aligned (descriptor N of a table
 * is at byte offset N * 64 of its mapping). The kernel updates @pir and
 * @control with atomic operations; a reader of a mapping sees each 64-bit word
 * atomically, but not the descriptor as a whole.
 */
struct kvmlu_pi_desc {
	__aligned_u64 pir[4];
	__aligned_u64 control;
	__aligned_u64 reserved[3];
};

#define KVMLU_PI_ON_BIT		0
#define KVMLU_PI_SN_BIT		1
#define KVMLU_PI_NV_SHIFT	16
#define KVMLU_PI_NV_MASK	0xffULL
#define KVMLU_PI_NDST_SHIFT	32
#define KVMLU_PI_NDST_MASK	0xffffffffULL

/**
 * struct kvmlu_stats - what the posting engine did
 * @signals: Posts asked for: eventfd counts consumed by bindings, and POST
 *	calls. Always @posted + @coalesced.
 * @posted: Posts that set a PIR bit that was clear.
 * @coalesced: Posts of a vector that was already pending.
 * @notified: Times ON went from 0 to 1 (after a post, or when SN was
 *	cleared with vectors pending); each signals the target if one is set.
 * @suppressed: Posts that set a PIR bit while SN was set.
 *
 * All fields are Output.
 */
struct kvmlu_stats {
	__aligned_u64 signals;
	__aligned_u64 posted;
	__aligned_u64 coalesced;
	__aligned_u64 notified;
	__aligned_u64 suppressed;
};

/**
 * struct kvmlu_query - KVMLU_QUERY: what this kvmlu module offers
 * @size: Input. sizeof(struct kvmlu_query).
 * @flags: Input. Must be zero.
 * @api_version: Output. KVMLU_API_VERSION of the running module.
 * @max_vcpus: Output. The largest vCPU count of a table.
 * @capabilities: Output. KVMLU_CAP_* bits.
 * @nr_tables: Output. Tables that currently exist, in any process.
 * @nr_bindings: Output. IRQ bindings that currently exist.
 * @nr_sessions: Output. Sessions that currently exist (not finished), of
 *	every owner: a count, as @nr_tables, not a listing.
 * @reserved: Output. Zero.
 * @stats: Output. The posting counters of every table since the module was
 *	loaded, those closed included.
 *
 * Issued on /dev/kvmlu.
 */
struct kvmlu_query {
	__u32 size;
	__u32 flags;
	__u32 api_version;
	__u32 max_vcpus;
	__aligned_u64 capabilities;
	__aligned_u64 nr_tables;
	__aligned_u64 nr_bindings;
	__u32 nr_sessions;
	__u32 reserved;
	struct kvmlu_stats stats;
};

/* Descriptor tables, their ioctls and a read-only mmap(). */
#define KVMLU_CAP_TABLES	(1ULL << 0)
/* IRQ bindings of eventfds to descriptors, and posting counters. */
#define KVMLU_CAP_BINDINGS	(1ULL << 1)
/* Sessions that preserve objects for a successor process. */
#define KVMLU_CAP_SESSIONS	(1ULL << 2)

#define KVMLU_QUERY _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_QUERY)

/**
 * struct kvmlu_create_table - KVMLU_CREATE_TABLE: a new descriptor table
 * @size: Input. sizeof(struct kvmlu_create_table).
 * @flags: Input. Must be zero.
 * @nr_vcpus: Input. Descriptors in the table, 1..KVMLU_MAX_VCPUS.
 * @fd: Output. The new table's file descriptor (O_CLOEXEC).
 *
 * Issued on /dev/kvmlu. Every descriptor starts zeroed: no vector pending,
 * ON and SN clear, NV and NDST zero, and no notification target.
 */
struct kvmlu_create_table {
	__u32 size;
	__u32 flags;
	__u32 nr_vcpus;
	__s32 fd;
};

#define KVMLU_CREATE_TABLE _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_CREATE_TABLE)

/**
 * struct kvmlu_table_set_notify - KVMLU_TABLE_SET_NOTIFY: a vCPU's target
 * @size: Input. sizeof(struct kvmlu_table_set_notify).
 * @flags: Input. KVMLU_SET_NOTIFY_* bits.
 * @vcpu: Input. The descriptor's index in the table.
 * @eventfd: Input. The eventfd to signal when ON goes from 0 to 1, or -1 to
 *	signal nothing. The table holds its own reference to the eventfd.
 * @nv: Input. Notification Vector written to the descriptor, 32..255.
 * @ndst: Input. Notification Destination written to the descriptor.
 *
 * Replaces the previous target. ON, SN and PIR are left as they are, unless
 * @flags has KVMLU_SET_NOTIFY_ATTACH: the caller is a new owner taking over
 * the descriptor (after a handoff). Then, if SN is clear and PIR holds a
 * vector, ON is set; and if ON is set, the new target is signalled once, so
 * the new owner fetches whatever arrived while nobody was listening. PIR is
 * never written.
 */
struct kvmlu_table_set_notify {
	__u32 size;
	__u32 flags;
	__u32 vcpu;
	__s32 eventfd;
	__u32 nv;
	__u32 ndst;
};

/* Take over the descriptor: recompute ON and signal the new target. */
#define KVMLU_SET_NOTIFY_ATTACH		(1U << 0)
#define KVMLU_SET_NOTIFY_FLAGS		KVMLU_SET_NOTIFY_ATTACH

#define KVMLU_TABLE_SET_NOTIFY _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_TABLE_SET_NOTIFY)

/**
 * struct kvmlu_table_set_sn - KVMLU_TABLE_SET_SN: suppress notifications
 * @size: Input. sizeof(struct kvmlu_table_set_sn).
 * @flags: Input. Must be zero.
 * @vcpu: Input. The descriptor's index in the table.
 * @suppress: Input. 1 sets SN, 0 clears it; other values are refused.
 *
 * While SN is set, a post sets its PIR bit and nothing else. Each post
 * decides on SN and ON in one atomic step of the control word, so once
 * setting SN has returned no post sets ON until SN is cleared (ON itself is
 * left as it is: a FETCH clears it, and it then stays clear). A post that set
 * ON before SN was set may still be signalling the target as the call
 * returns. Clearing SN while PIR holds a vector sets ON in the same step and,
 * if ON was clear, signals the notification target once, so nothing posted
 * while suppressed stays unnoticed; a post racing the clear either sees SN
 * clear or is seen by it.
 */
struct kvmlu_table_set_sn {
	__u32 size;
	__u32 flags;
	__u32 vcpu;
	__u32 suppress;
};

#define KVMLU_TABLE_SET_SN _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_TABLE_SET_SN)

/**
 * struct kvmlu_table_peek - KVMLU_TABLE_PEEK: copy one descriptor
 * @size: Input. sizeof(struct kvmlu_table_peek).
 * @flags: Input. Must be zero.
 * @vcpu: Input. The descriptor's index in the table.
 * @reserved: Must be zero.
 * @desc: Output. The descriptor, word by word. Nothing in it changes.
 */
struct kvmlu_table_peek {
	__u32 size;
	__u32 flags;
	__u32 vcpu;
	__u32 reserved;
	struct kvmlu_pi_desc desc;
};

#define KVMLU_TABLE_PEEK _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_TABLE_PEEK)

/**
 * struct kvmlu_table_fetch - KVMLU_TABLE_FETCH: take the pending vectors
 * @size: Input. sizeof(struct kvmlu_table_fetch).
 * @flags: Input. Must be zero.
 * @vcpu: Input. The descriptor's index in the table.
 * @reserved: Must be zero.
 * @pir: Output. The vectors that were pending, in the layout of
 *	&kvmlu_pi_desc.pir.
 *
 * Clears ON, then exchanges each PIR word with zero. Each posted vector is
 * returned by exactly one fetch: a vector posted during the fetch is either
 * returned or left pending with ON set and the target signalled.
 */
struct kvmlu_table_fetch {
	__u32 size;
	__u32 flags;
	__u32 vcpu;
	__u32 reserved;
	__aligned_u64 pir[4];
};

#define KVMLU_TABLE_FETCH _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_TABLE_FETCH)

/**
 * struct kvmlu_table_post - KVMLU_TABLE_POST: post a vector
 * @size: Input. sizeof(struct kvmlu_table_post).
 * @flags: Input. Must be zero.
 * @vcpu: Input. The descriptor's index in the table.
 * @vector: Input. The vector, 32..255.
 * @result: Output. KVMLU_POST_* bits saying what the post did.
 * @reserved: Must be zero.
 *
 * Posts exactly as an IRQ binding does: set the vector's PIR bit; if it was
 * already set the post coalesces and ends there. Otherwise, unless SN is set,
 * set ON, and if ON was clear signal the notification target.
 */
struct kvmlu_table_post {
	__u32 size;
	__u32 flags;
	__u32 vcpu;
	__u32 vector;
	__u32 result;
	__u32 reserved;
};

/* The vector was pending already: nothing else was done. */
#define KVMLU_POST_COALESCED	(1U << 0)
/* SN was set: the PIR bit is set, ON is not, nobody was signalled. */
#define KVMLU_POST_SUPPRESSED	(1U << 1)
/* ON went from 0 to 1 and the notification target, if any, was signalled. */
#define KVMLU_POST_NOTIFIED	(1U << 2)

#define KVMLU_TABLE_POST _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_TABLE_POST)

/**
 * struct kvmlu_table_bind - KVMLU_TABLE_BIND: post a vector on each signal
 * @size: Input. sizeof(struct kvmlu_table_bind).
 * @flags: Input. Must be zero.
 * @eventfd: Input. The eventfd to consume, for example the MSI trigger
 *	eventfd given to VFIO_DEVICE_SET_IRQS.
 * @vcpu: Input. The descriptor's index in the table.
 * @vector: Input. The vector to post, 32..255.
 * @fd: Output. The binding's file descriptor (O_CLOEXEC).
 *
 * From now on, each time the eventfd is signalled the kernel drains its
 * counter and posts @vector to @vcpu in its wakeup callback, as KVM's irqfd
 * does; no userspace runs on that path. A counter of N read at once counts
 * as N signals: the first posts, the others coalesce with it. A count that
 * is pending when the binding is made is posted at once.
 *
 * The binding is the eventfd's only consumer. Like KVM's irqfd it waits on
 * the eventfd as a priority, exclusive waiter: it takes each signal before
 * anyone else is woken, and nobody else is woken for it. So:
 *
 *  - BIND fails with EBUSY if the eventfd already has such a consumer: a
 *    kvmlu binding, of this table or of any other, or a KVM irqfd
 *    (KVM_IRQFD, QEMU's default for a passthrough device's MSI). Nothing
 *    changes: the first consumer keeps every signal.
 *  - Userspace must not poll, select, epoll or read a bound eventfd: a
 *    poller is not woken for signals the binding consumed, and a read
 *    finds the counter empty (EAGAIN, or it blocks).
 *  - A KVM irqfd attached to the eventfd AFTER the binding is refused by
 *    KVM with EBUSY where KVM, like BIND, refuses an eventfd that has a
 *    priority waiter (Linux 7.3). Linux 6.1 and 6.12 accept it (they check
 *    only their own irqfds of the same VM for the eventfd): it is queued
 *    behind the binding, since priority waiters are woken in the order
 *    they were queued, and never sees a signal; the binding keeps posting
 *    every one. The irqfd injects nothing from
 *    the eventfd's count; when the eventfd is closed both see EPOLLHUP and
 *    let go. With a posted-interrupt IOMMU, such an irqfd may also take
 *    the device's MSI away from the eventfd altogether (KVM's IRQ bypass
 *    pairs it with VFIO's interrupt, keyed by the same eventfd): then the
 *    eventfd is not signalled and the binding posts nothing. Do not attach
 *    both.
 *
 * BIND fails with EINVAL for an EFD_SEMAPHORE eventfd, whose reads take one
 * count at a time. To find out, BIND signals the eventfd by 2 itself once
 * the binding is queued, and its callback takes those 2 back before anyone
 * else is woken: a pending count is unchanged by a refused BIND, and posted
 * exactly by one that succeeds.
 *
 * The binding holds the table and the eventfd's context, not the eventfd's
 * file: when the last file reference to the eventfd goes, the binding
 * deactivates (&kvmlu_binding_info.state loses KVMLU_BINDING_ACTIVE) and
 * posts nothing more. Closing the binding's fd detaches it, and the eventfd
 * can then be bound again.
 */
struct kvmlu_table_bind {
	__u32 size;
	__u32 flags;
	__s32 eventfd;
	__u32 vcpu;
	__u32 vector;
	__s32 fd;
};

#define KVMLU_TABLE_BIND _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_TABLE_BIND)


/**
 * struct kvmlu_table_info - KVMLU_TABLE_INFO: a table's size and counters
 * @size: Input. sizeof(struct kvmlu_table_info).
 * @flags: Input. Must be zero.
 * @nr_vcpus: Output. Descriptors in the table.
 * @nr_bindings: Output. Bindings attached to the table.
 * @stats: Output. The table's counters, over all bindings and POST calls.
 */
struct kvmlu_table_info {
	__u32 size;
	__u32 flags;
	__u32 nr_vcpus;
	__u32 nr_bindings;
	struct kvmlu_stats stats;
};

#define KVMLU_TABLE_INFO _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_TABLE_INFO)

/**
 * struct kvmlu_binding_info - KVMLU_BINDING_INFO: what a binding is bound to
 * @size: Input. sizeof(struct kvmlu_binding_info).
 * @flags: Input. Must be zero.
 * @vcpu: Output. The descriptor the binding posts to.
 * @vector: Output. The vector it posts.
 * @state: Output. KVMLU_BINDING_* bits.
 * @reserved: Output. Zero.
 * @stats: Output. This binding's counters (@stats.signals counts eventfd
 *	signals consumed).
 *
 * Issued on a binding's file descriptor.
 */
struct kvmlu_binding_info {
	__u32 size;
	__u32 flags;
	__u32 vcpu;
	__u32 vector;
	__u32 state;
	__u32 reserved;
	struct kvmlu_stats stats;
};

/* The binding listens to its eventfd. */
#define KVMLU_BINDING_ACTIVE	(1U << 0)
/* The eventfd's last file reference went: the binding is inactive. */
#define KVMLU_BINDING_HUP	(1U << 1)

#define KVMLU_BINDING_INFO _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_BINDING_INFO)

/**
 * DOC: vAPIC modules
 *
 * kvmlu_vapic_v1.ko and kvmlu_vapic_v2.ko are built from one source and can
 * be loaded side by side; each offers /dev/kvmlu_vapic_v<N>. A vAPIC object
 * is attached to a kvmlu table (which it keeps alive) and holds, per vCPU, the
 * virtual APIC's interrupt state: IRR and ISR, and in version 2 also TMR and
 * a per-vector count of acknowledged interrupts. SYNC moves PIR into IRR,
 * ACK moves the highest deliverable vector from IRR to ISR, EOI retires the
 * highest in-service vector. SAVE writes the state as a blob (a
 * &struct kvmlu_vapic_blob header, then one record per vCPU); LOAD reads
 * one. Version 2 loads version 1 blobs (the new fields start at zero);
 * version 1 refuses version 2 blobs with EPROTONOSUPPORT, and version 2 can
 * save in version 1's format for the way back. Loading never touches PIR:
 * what was posted while the state travelled stays pending.
 *
 * LOAD's errors: EINVAL for a blob shorter than its header or its stated
 * size, or with sizes that do not add up, or a record with any of vectors
 * 0..31 in IRR, ISR or TMR; EBADMSG for a wrong magic or checksum; ERANGE
 * for a vCPU count other than the table's, in either format (a whole blob
 * of more than KVMLU_MAX_VCPUS vCPUs gets ERANGE before its checksum is
 * read); EPROTONOSUPPORT for a format version this module does not read. A
 * refused LOAD changes nothing.
 *
 * Loading a vAPIC module (finit_module()) checks that it was built for the
 * running kvmlu.ko: EPROTO if it was built for another version of kvmlu.ko's
 * in-kernel interface, EOVERFLOW if one of its commands has a structure
 * larger than kvmlu.ko's dispatcher copies in. Either is logged in one line
 * with both versions or both sizes; the refused module registers nothing and
 * kvmlu.ko and the vAPIC modules already loaded go on unchanged.
 */

/* Commands on /dev/kvmlu_vapic_v<N>. */
enum {
	KVMLU_VAPIC_DEV_CMD_BASE = 0x80,
	KVMLU_CMD_VAPIC_QUERY = KVMLU_VAPIC_DEV_CMD_BASE,
	KVMLU_CMD_CREATE_VAPIC = 0x81,
};

/* Commands on a vAPIC file descriptor. */
enum {
	KVMLU_VAPIC_CMD_BASE = 0xA0,
	KVMLU_CMD_VAPIC_SYNC = KVMLU_VAPIC_CMD_BASE,
	KVMLU_CMD_VAPIC_ACK = 0xA1,
	KVMLU_CMD_VAPIC_EOI = 0xA2,
	KVMLU_CMD_VAPIC_GET = 0xA3,
	KVMLU_CMD_VAPIC_SAVE = 0xA4,
	KVMLU_CMD_VAPIC_LOAD = 0xA5,
};

/**
 * struct kvmlu_vapic_query - KVMLU_VAPIC_QUERY: which vAPIC module this is
 * @size: Input. sizeof(struct kvmlu_vapic_query).
 * @flags: Input. Must be zero.
 * @version: Output. The module's version (1 or 2), also its save format's.
 * @min_load_version: Output. The oldest format version LOAD accepts.
 * @vcpu_record_size: Output. Bytes of one vCPU record in its SAVE format.
 * @reserved: Output. Zero.
 */
struct kvmlu_vapic_query {
	__u32 size;
	__u32 flags;
	__u32 version;
	__u32 min_load_version;
	__u32 vcpu_record_size;
	__u32 reserved;
};

#define KVMLU_VAPIC_QUERY _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_VAPIC_QUERY)

/**
 * struct kvmlu_create_vapic - KVMLU_CREATE_VAPIC: a vAPIC for a table
 * @size: Input. sizeof(struct kvmlu_create_vapic).
 * @flags: Input. Must be zero.
 * @table_fd: Input. A kvmlu table; EINVAL for any other file.
 * @fd: Output. The vAPIC's file descriptor (O_CLOEXEC).
 *
 * The new state is empty: nothing requested, nothing in service.
 */
struct kvmlu_create_vapic {
	__u32 size;
	__u32 flags;
	__s32 table_fd;
	__s32 fd;
};

#define KVMLU_CREATE_VAPIC _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_CREATE_VAPIC)

/**
 * struct kvmlu_vapic_vcpu - KVMLU_VAPIC_SYNC, _ACK, _EOI or _GET on a vCPU
 * @size: Input. sizeof(struct kvmlu_vapic_vcpu).
 * @flags: Input. Must be zero.
 * @vcpu: Input. The vCPU.
 * @vector: Output. ACK: the vector now in service; EOI: the vector
 *	retired; 0 if there was none.
 * @irr: Output. IRR after the command, in the layout of PIR.
 * @isr: Output. ISR after the command.
 * @tmr: Output. TMR (version 2; zero in version 1).
 * @moved: Output. SYNC: the vectors taken from PIR into IRR.
 */
struct kvmlu_vapic_vcpu {
	__u32 size;
	__u32 flags;
	__u32 vcpu;
	__u32 vector;
	__aligned_u64 irr[4];
	__aligned_u64 isr[4];
	__aligned_u64 tmr[4];
	__aligned_u64 moved[4];
};

#define KVMLU_VAPIC_SYNC _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_VAPIC_SYNC)
#define KVMLU_VAPIC_ACK _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_VAPIC_ACK)
#define KVMLU_VAPIC_EOI _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_VAPIC_EOI)
#define KVMLU_VAPIC_GET _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_VAPIC_GET)

/* "KVAP", little-endian. */
#define KVMLU_VAPIC_MAGIC	0x5041564bU

/**
 * struct kvmlu_vapic_blob - the header of a saved vAPIC state
 * @magic: KVMLU_VAPIC_MAGIC.
 * @version: The format version (the saving module's version).
 * @header_size: sizeof(struct kvmlu_vapic_blob).
 * @size: Bytes of the whole blob, header included.
 * @nr_vcpus: vCPU records that follow.
 * @vcpu_size: Bytes of one record: 64 in version 1 (IRR, ISR), 1120 in
 *	version 2 (IRR, ISR, TMR, then 256 __u32 acknowledged counts).
 * @checksum: CRC-32 (as zlib's crc32()) of the bytes after the header.
 */
struct kvmlu_vapic_blob {
	__u32 magic;
	__u16 version;
	__u16 header_size;
	__u32 size;
	__u32 nr_vcpus;
	__u32 vcpu_size;
	__u32 checksum;
};

/**
 * struct kvmlu_vapic_save - KVMLU_VAPIC_SAVE: write the state as a blob
 * @size: Input. sizeof(struct kvmlu_vapic_save).
 * @flags: Input. Must be zero.
 * @buf: Input. User address of the buffer.
 * @buf_len: Input. Its length; ENOSPC if the blob does not fit.
 * @blob_size: Output. The blob's size, also when it did not fit.
 * @format: Input. The format version to write: 0 for the module's own, or
 *	an older one it can write down to (&kvmlu_vapic_query.min_load_version),
 *	so that state can go back to an older module. Writing version 1 from
 *	version 2 drops the acknowledged counts and is refused with EOPNOTSUPP
 *	while any TMR bit is set, which version 1 cannot hold. A newer version
 *	than the module's is EPROTONOSUPPORT.
 * @reserved: Must be zero.
 */
struct kvmlu_vapic_save {
	__u32 size;
	__u32 flags;
	__aligned_u64 buf;
	__u32 buf_len;
	__u32 blob_size;
	__u32 format;
	__u32 reserved;
};

#define KVMLU_VAPIC_SAVE _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_VAPIC_SAVE)

/**
 * struct kvmlu_vapic_load - KVMLU_VAPIC_LOAD: replace the state from a blob
 * @size: Input. sizeof(struct kvmlu_vapic_load).
 * @flags: Input. Must be zero.
 * @buf: Input. User address of the blob.
 * @buf_len: Input. Bytes at @buf.
 * @reserved: Must be zero.
 */
struct kvmlu_vapic_load {
	__u32 size;
	__u32 flags;
	__aligned_u64 buf;
	__u32 buf_len;
	__u32 reserved;
};

#define KVMLU_VAPIC_LOAD _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_VAPIC_LOAD)

/* The length of a session name, its terminating NUL included. */
#define KVMLU_SESSION_NAME_LEN	64

/**
 * DOC: Sessions
 *
 * A session hands objects from a process to its successor, as Linux's Live
 * Update Orchestrator does across a kexec. The old process creates a named
 * session and preserves file descriptors in it, each under a u64 token of
 * its choosing; the session holds a reference to each file. When the last
 * session fd is closed, the session stays, with its objects: a preserved
 * binding keeps posting, a preserved VFIO device stays open and keeps
 * raising its MSIs, even while no process holds any of them. A new process
 * retrieves the session by name and each object by token, then finishes the
 * session, which drops what the session still holds. Each session holds a
 * reference on kvmlu.ko until it is finished: the module cannot be unloaded
 * under a preserved session.
 *
 * A session preserves these files and no others, on every kernel alike:
 * kvmlu tables and bindings; eventfds; pipes and FIFOs; memfds and other
 * regular files of tmpfs or hugetlbfs (guest RAM, saved state); VFIO's
 * container (/dev/vfio/vfio), group and device fds. Anything else is
 * EOPNOTSUPP: in particular every file that can itself hold references to
 * other files -- sessions, sockets (fds in flight), epoll and io_uring
 * instances -- because such a file could keep its own session alive
 * forever, and files whose state is not known to survive their owner
 * (other device nodes, files of other filesystems, pidfds and other
 * anonymous-inode files).
 *
 * A file is preserved once: PRESERVE of a file that a session (this one or
 * another) holds already is EALREADY, whichever fd names it. An owner (see
 * "Session owners") may have at most max_sessions_per_owner sessions
 * (a kvmlu.ko parameter, 1024 unless changed) until they are finished,
 * whether or not any process still holds them: CREATE_SESSION beyond that
 * is EDQUOT. A session preserves at most max_objects_per_session files
 * (65536 unless changed): PRESERVE beyond that is ENOSPC. A change of
 * either parameter applies to what is created after it.
 *
 * Names are NUL-terminated strings of 1..63 bytes, the rest of the field
 * zero; anything else is EINVAL.
 */

/**
 * DOC: Session owners
 *
 * A session belongs to the task that created it: its effective uid and its
 * user namespace, as they are at CREATE_SESSION. The caller's identity is
 * that of the calling task at each ioctl, not that of whoever opened
 * /dev/kvmlu, so a device fd handed from a privileged launcher to a VMM
 * lends the VMM nobody's sessions. (Linux's Live Update Orchestrator allows
 * one opener of its device at a time instead; kvmlu serves several VMMs, of
 * several users, at once.)
 *
 * RETRIEVE_SESSION and LIST_SESSIONS see a session only if the caller is
 * its owner (same effective uid in the same user namespace), or has
 * CAP_SYS_ADMIN in the owner's user namespace: root of the initial
 * namespace, the administrator of any namespace above the owner's, and the
 * user who created the owner's namespace. A session the caller may not
 * retrieve is not listed and is ENOENT to RETRIEVE_SESSION, as if it did
 * not exist; a refusal changes nothing. A process in a new user namespace is
 * a new owner even if it is root there and mapped to the same kernel uid.
 *
 * Names are unique per owner, not globally: another user cannot take a
 * name first to make CREATE_SESSION fail or to plant objects under it.
 * RETRIEVE_SESSION looks for the caller's own session of that name first;
 * only if there is none does it take another owner's it administers, and
 * it refuses with ENOTUNIQ when several owners have one. LIST_SESSIONS then
 * shows the name once per owner. A privileged successor should retrieve only
 * names its predecessor said it created.
 *
 * A session keeps its owner's user namespace alive. When no task is left in
 * that namespace the session stays, with its objects, and whoever
 * administers the namespace (its creator, root) can still retrieve or
 * finish it.
 *
 * Once opened, a session fd is a capability like any other file: whoever
 * holds it (for example after SCM_RIGHTS) may use it, whatever its uid.
 */

/**
 * struct kvmlu_session_create - KVMLU_CREATE_SESSION or KVMLU_RETRIEVE_SESSION
 * @size: Input. sizeof(struct kvmlu_session_create).
 * @flags: Input. Must be zero.
 * @name: Input. The session's name.
 * @fd: Output. The session's file descriptor (O_CLOEXEC).
 * @reserved: Must be zero.
 *
 * CREATE makes a new session owned by the caller (EEXIST if the caller has
 * one of that name, EDQUOT if it has as many as it may). RETRIEVE opens an
 * existing one: the caller's own of that name, else the one of another
 * owner the caller administers (ENOENT if there is none, ENOTUNIQ if there
 * are several, EBUSY while any file descriptor of that session is open).
 * See "Session owners".
 */
struct kvmlu_session_create {
	__u32 size;
	__u32 flags;
	__u8 name[KVMLU_SESSION_NAME_LEN];
	__s32 fd;
	__u32 reserved;
};

#define KVMLU_CREATE_SESSION _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_CREATE_SESSION)
#define KVMLU_RETRIEVE_SESSION _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_RETRIEVE_SESSION)

/**
 * struct kvmlu_session_entry - one session, as KVMLU_LIST_SESSIONS reports it
 * @name: The session's name.
 * @nr_objects: Objects it preserves.
 * @state: KVMLU_SESSION_HELD if a file descriptor of it is open.
 */
struct kvmlu_session_entry {
	__u8 name[KVMLU_SESSION_NAME_LEN];
	__u32 nr_objects;
	__u32 state;
};

#define KVMLU_SESSION_HELD	(1U << 0)

/**
 * struct kvmlu_list_sessions - KVMLU_LIST_SESSIONS: the sessions that exist
 * @size: Input. sizeof(struct kvmlu_list_sessions).
 * @flags: Input. Must be zero.
 * @count: Input. Room in @entries, in entries.
 * @nr_sessions: Output. Sessions the caller may retrieve (see "Session
 *	owners"); only those are listed. Entries beyond @count were not
 *	written.
 * @entries: Input. User address of an array of &struct kvmlu_session_entry.
 */
struct kvmlu_list_sessions {
	__u32 size;
	__u32 flags;
	__u32 count;
	__u32 nr_sessions;
	__aligned_u64 entries;
};

#define KVMLU_LIST_SESSIONS _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_LIST_SESSIONS)

/**
 * struct kvmlu_session_preserve - KVMLU_SESSION_PRESERVE: keep a file
 * @size: Input. sizeof(struct kvmlu_session_preserve).
 * @flags: Input. Must be zero.
 * @fd: Input. The file descriptor to preserve.
 * @reserved: Must be zero.
 * @token: Input. The token to retrieve it by; unique in the session.
 *
 * EOPNOTSUPP for a file of a type not listed in "Sessions", EEXIST for a
 * token in use, EALREADY for a file some session holds already, ENOSPC when
 * the session is full.
 */
struct kvmlu_session_preserve {
	__u32 size;
	__u32 flags;
	__s32 fd;
	__u32 reserved;
	__aligned_u64 token;
};

#define KVMLU_SESSION_PRESERVE _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_SESSION_PRESERVE)

/**
 * struct kvmlu_session_token - KVMLU_SESSION_RETRIEVE or KVMLU_SESSION_UNPRESERVE
 * @size: Input. sizeof(struct kvmlu_session_token).
 * @flags: Input. Must be zero.
 * @token: Input. The object's token.
 * @fd: Output of RETRIEVE: a new file descriptor (O_CLOEXEC) for the
 *	object. UNPRESERVE: must be zero.
 * @reserved: Must be zero.
 *
 * RETRIEVE gives the caller its own file descriptor and leaves the object in
 * the session, so a successor that dies can start over. UNPRESERVE drops the
 * session's reference.
 */
struct kvmlu_session_token {
	__u32 size;
	__u32 flags;
	__aligned_u64 token;
	__s32 fd;
	__u32 reserved;
};

#define KVMLU_SESSION_RETRIEVE _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_SESSION_RETRIEVE)
#define KVMLU_SESSION_UNPRESERVE _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_SESSION_UNPRESERVE)

/**
 * struct kvmlu_session_finish - KVMLU_SESSION_FINISH: end the session
 * @size: Input. sizeof(struct kvmlu_session_finish).
 * @flags: Input. Must be zero.
 *
 * Drops every object the session still holds and removes the session, so
 * its name can be used again. The fd stays open; every command on it but
 * FINISH fails with ESTALE from then on, and FINISH does nothing.
 */
struct kvmlu_session_finish {
	__u32 size;
	__u32 flags;
};

#define KVMLU_SESSION_FINISH _IO(KVMLU_IOCTL_TYPE, KVMLU_CMD_SESSION_FINISH)

#endif /* _UAPI_LINUX_KVMLU_H */
