/* SPDX-License-Identifier: GPL-2.0 */
/*
 * kvmlu: what the parts of kvmlu.ko share.
 */
#ifndef _KVMLU_INTERNAL_H
#define _KVMLU_INTERNAL_H

#include <linux/atomic.h>
#include <linux/fs.h>
#include <linux/irq_work.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/spinlock.h>
#include <linux/types.h>
#include <linux/kvmlu.h>

#if BITS_PER_LONG != 64
#error "kvmlu addresses PIR and control words as unsigned long bitmaps"
#endif

/*
 * The version of the in-kernel interface kvmlu.ko exports to the vAPIC
 * modules: the symbols in the KVMLU namespace and everything their callers
 * see of kvmlu.ko without a symbol CRC covering it, above all the size of
 * union kvmlu_ucmd_buffer on kvmlu.ko's stack and the meaning of each call.
 * Bump it whenever any of that changes; a vAPIC module refuses to load on a
 * kvmlu.ko whose kvmlu_kapi_version() differs from the one it was built with.
 *
 * 1: kvmlu_kapi_version() and kvmlu_ioctl_ops_check() exist;
 *    kvmlu_table_take_pir() returns -ERANGE for a vCPU beyond the table.
 */
#define KVMLU_KAPI_VERSION	1

/*
 * The symbol namespace of that interface. Kernels before 6.13 take the
 * namespace as a bare word and stringify it; later ones take the string.
 */
#ifdef KVMLU_HAVE_NS_TOKEN
#define KVMLU_NS		KVMLU
#else
#define KVMLU_NS		"KVMLU"
#endif

/* The reply of any kvmlu ioctl spans at most this many pages. */
#define KVMLU_REPLY_MAX_PAGES	2

/**
 * struct kvmlu_ucmd - one ioctl call as the dispatcher hands it over
 * @ubuffer: The user's argument.
 * @user_size: The size the user passed in the structure's first field.
 * @cmd: The kernel's copy of the argument, already checked for an unknown
 *	non-zero tail.
 * @obj: The object of the file the ioctl was issued on (NULL for
 *	/dev/kvmlu, a &struct kvmlu_table for a table).
 * @reply_pages: For a command with a reply, the user pages the reply goes
 *	to, pinned writable before the handler runs, so that writing the reply
 *	cannot fail or stall once the command has acted.
 * @nr_reply_pages: Entries of @reply_pages pinned; 0 for a command without
 *	a reply.
 * @replied: kvmlu_ucmd_respond() wrote the reply (the pages are dirty).
 */
struct kvmlu_ucmd {
	void __user *ubuffer;
	u32 user_size;
	void *cmd;
	void *obj;
	struct page *reply_pages[KVMLU_REPLY_MAX_PAGES];
	unsigned int nr_reply_pages;
	bool replied;
};

/**
 * struct kvmlu_ioctl_op - one entry of an ioctl dispatch table
 * @size: sizeof() the command's structure as this module knows it.
 * @min_size: The smallest size userspace may pass: offsetofend() of the last
 *	field of the structure as first released.
 * @ioctl_num: The full ioctl request number.
 * @reply: The command writes output fields back: the dispatcher pins the
 *	user's structure writable before the handler runs (EFAULT otherwise,
 *	with nothing done).
 * @execute: The handler; runs in process context, may sleep.
 */
struct kvmlu_ioctl_op {
	unsigned int size;
	unsigned int min_size;
	unsigned int ioctl_num;
	bool reply;
	int (*execute)(struct kvmlu_ucmd *ucmd);
};

#define __KVMLU_IOCTL_OP(_base, _ioctl, _fn, _struct, _last, _reply)	\
	[_IOC_NR(_ioctl) - (_base)] = {					\
		.size = sizeof(_struct) +				\
			BUILD_BUG_ON_ZERO(sizeof(union kvmlu_ucmd_buffer) < \
					  sizeof(_struct)) +		\
			BUILD_BUG_ON_ZERO(sizeof(_struct) > PAGE_SIZE),	\
		.min_size = offsetofend(_struct, _last),		\
		.ioctl_num = _ioctl,					\
		.reply = _reply,					\
		.execute = _fn,						\
	}

/* A command that writes output fields back with kvmlu_ucmd_respond(). */
#define KVMLU_IOCTL_OP(_base, _ioctl, _fn, _struct, _last)		\
	__KVMLU_IOCTL_OP(_base, _ioctl, _fn, _struct, _last, true)
/* A command whose structure is input only. */
#define KVMLU_IOCTL_OP_IN(_base, _ioctl, _fn, _struct, _last)		\
	__KVMLU_IOCTL_OP(_base, _ioctl, _fn, _struct, _last, false)

/* Large enough for the argument of any kvmlu ioctl. */
union kvmlu_ucmd_buffer {
	struct kvmlu_query query;
	struct kvmlu_create_table create_table;
	struct kvmlu_table_set_notify set_notify;
	struct kvmlu_table_set_sn set_sn;
	struct kvmlu_table_peek peek;
	struct kvmlu_table_fetch fetch;
	struct kvmlu_table_post post;
	struct kvmlu_table_bind bind;
	struct kvmlu_table_info table_info;
	struct kvmlu_binding_info binding_info;
	struct kvmlu_session_create session_create;
	struct kvmlu_list_sessions list_sessions;
	struct kvmlu_session_preserve session_preserve;
	struct kvmlu_session_token session_token;
	struct kvmlu_session_finish session_finish;
	struct kvmlu_vapic_query vapic_query;
	struct kvmlu_create_vapic create_vapic;
	struct kvmlu_vapic_vcpu vapic_vcpu;
	struct kvmlu_vapic_save vapic_save;
	struct kvmlu_vapic_load vapic_load;
};

unsigned int kvmlu_kapi_version(void);
int kvmlu_ioctl_ops_check(const char *owner, const struct kvmlu_ioctl_op *ops,
			  size_t nr_ops, unsigned int base);
long kvmlu_ioctl_dispatch(const struct kvmlu_ioctl_op *ops, size_t nr_ops,
			  unsigned int base, unsigned int cmd,
			  unsigned long arg, void *obj);
int kvmlu_ucmd_respond(struct kvmlu_ucmd *ucmd, size_t size);
int kvmlu_ucmd_reply_fd(struct kvmlu_ucmd *ucmd, size_t size, int fd,
			struct file *file);

/**
 * struct kvmlu_vcpu - the kernel's side of one descriptor
 * @notify: The eventfd signalled when ON goes from 0 to 1, or NULL.
 *	Replaced under &kvmlu_table.lock; read under RCU (a post takes no
 *	lock to signal it). A replaced eventfd is put after a grace period.
 * @notify_work: Signals @notify from a context where signalling an eventfd
 *	directly could nest one eventfd's wait-queue lock inside another's
 *	(the wakeup callback of an IRQ binding).
 * @deferred: Notifications queued for @notify_work and not yet sent, so that
 *	the target sees one signal per ON transition even when the work runs
 *	once for several. Atomic; no lock.
 */
struct kvmlu_vcpu {
	struct eventfd_ctx __rcu *notify;
	struct irq_work notify_work;
	atomic_t deferred;
};

/**
 * struct kvmlu_counters - what the posting engine did, per table or binding
 * @signals: Posts asked for.
 * @posted: Posts that set a PIR bit that was clear.
 * @coalesced: Posts of a vector that was already pending.
 * @notified: ON transitions from 0 to 1.
 * @suppressed: Posts that set a PIR bit while SN was set.
 *
 * The meaning of each is that of &struct kvmlu_stats. Updated with atomic
 * operations from any context; no lock. A reader sees each counter
 * atomically, not all of them at one instant.
 */
struct kvmlu_counters {
	atomic64_t signals;
	atomic64_t posted;
	atomic64_t coalesced;
	atomic64_t notified;
	atomic64_t suppressed;
};

void kvmlu_counters_account(struct kvmlu_counters *c, u32 result, u64 count);
void kvmlu_counters_read(struct kvmlu_counters *c, struct kvmlu_stats *out);

/**
 * struct kvmlu_table - a table of posted-interrupt descriptors
 * @ref: Keeps the table alive; the table file holds one reference.
 * @nr_vcpus: Number of descriptors; fixed at creation.
 * @desc: The descriptors, @nr_vcpus of them in page-aligned vmalloc memory
 *	that never moves (each 64-byte descriptor within one page). PIR and
 *	control words change only through atomic operations (see
 *	kvmlu_post()); NV and NDST are written with a compare-and-exchange of
 *	the control word under @lock.
 * @lock: Serialises the writers of each &kvmlu_vcpu.notify and of NV and
 *	NDST (SET_NOTIFY). Taken in process context only; posts do not take it.
 * @counters: Posting counters over all bindings and POST calls.
 * @bind_lock: Protects @bindings and writes of @nr_bindings, which readers
 *	(QUERY, INFO) take with READ_ONCE() and no lock. A mutex: bind and unbind
 *	sleep (they poll and unhook an eventfd).
 * @bindings: The &kvmlu_binding objects attached, via their @link.
 * @nr_bindings: Entries in @bindings.
 * @node: Entry in the module's list of tables, under kvmlu_tables_lock.
 * @vcpus: Per-descriptor kernel state, @nr_vcpus entries.
 */
struct kvmlu_table {
	struct kref ref;
	u32 nr_vcpus;
	struct kvmlu_pi_desc *desc;
	spinlock_t lock; /* see above */
	struct kvmlu_counters counters;
	struct mutex bind_lock; /* see above */
	struct list_head bindings;
	u32 nr_bindings;
	struct list_head node;
	struct kvmlu_vcpu vcpus[];
};

extern const struct kvmlu_ioctl_op kvmlu_table_ops[];
extern const size_t kvmlu_nr_table_ops;

int kvmlu_table_create(u32 nr_vcpus, struct file **filep);
void kvmlu_tables_totals(u64 *nr_tables, u64 *nr_bindings,
			 struct kvmlu_stats *stats);
void kvmlu_table_get(struct kvmlu_table *table);
void kvmlu_table_put(struct kvmlu_table *table);
u32 kvmlu_post(struct kvmlu_table *table, u32 vcpu, u32 vector, u64 count,
	       bool defer);

/* The in-kernel interface kvmlu.ko exports to the vAPIC modules. */
struct kvmlu_table *kvmlu_table_from_fd(int fd);
u32 kvmlu_table_nr_vcpus(struct kvmlu_table *table);
int kvmlu_table_take_pir(struct kvmlu_table *table, u32 vcpu, u64 pir[4]);

int kvmlu_table_bind(struct kvmlu_ucmd *ucmd);
bool kvmlu_is_table_file(struct file *file);
bool kvmlu_is_binding_file(struct file *file);

int kvmlu_create_session(struct kvmlu_ucmd *ucmd);
int kvmlu_retrieve_session(struct kvmlu_ucmd *ucmd);
int kvmlu_list_sessions(struct kvmlu_ucmd *ucmd);
u32 kvmlu_session_count(void);

#endif /* _KVMLU_INTERNAL_H */
