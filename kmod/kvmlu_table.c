// SPDX-License-Identifier: GPL-2.0
/*
 * kvmlu: descriptor tables and the posting engine.
 *
 * A table is an array of VT-d posted-interrupt descriptors in pages that never
 * move, so an interrupt-remapping entry could hold their physical address.
 * Everything that changes PIR or the ON and SN bits goes through the atomic
 * operations in this file; kvmlu_post() is the one posting engine, used by the
 * POST ioctl and by IRQ bindings (kvmlu_binding.c) alike.
 *
 * ON and SN live in one 64-bit control word, and every decision that depends
 * on both is one compare-and-exchange of that word: a post sets ON only if SN
 * is clear in the same step, SET_SN sets SN in one step (ON as it is), and
 * clears it in one step that also sets ON if PIR looked non-empty. No post
 * or attach ever sets ON while SN is set: once SET_SN(1) has returned, ON
 * only stays as it was (a post that set it just before may still be
 * signalling), and after a FETCH it stays clear until SN is cleared, as with
 * VT-d.
 *
 * Ordering: a post sets its PIR bit with a fully ordered test-and-set and only
 * then reads the control word. Clearing SN is a successful cmpxchg, also fully
 * ordered; if it did not set ON, PIR is read again after it, and a vector
 * found there sets ON with the same step a post uses. Of a post and a
 * concurrent SN clear, at least one sees the other (the post sees SN clear,
 * or the second look sees the PIR bit), so a vector posted while SN goes away
 * always ends with ON set and the target signalled exactly once: the cmpxchg
 * lets only one of them take ON from 0 to 1. A fetch clears ON before it
 * takes the PIR words, so a vector posted during a fetch is either taken or
 * finds ON clear and signals.
 *
 * A post takes no lock: it finds the vCPU's notification eventfd under RCU.
 * SET_NOTIFY replaces it under the table's spinlock and puts the old one
 * after a grace period, so a post that found the old one just before may
 * still signal it; a post that comes after SET_NOTIFY has returned signals
 * the new one.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/anon_inodes.h>
#include <linux/bitops.h>
#include <linux/build_bug.h>
#include <linux/eventfd.h>
#include <linux/file.h>
#include <linux/gfp.h>
#include <linux/mm.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>

#include "kvmlu_compat.h"
#include "kvmlu_internal.h"

/* The uAPI's layout of a descriptor: VT-d's. */
static_assert(sizeof(struct kvmlu_pi_desc) == 64);
static_assert(offsetof(struct kvmlu_pi_desc, pir) == 0);
static_assert(offsetof(struct kvmlu_pi_desc, control) == 32);

#define KVMLU_PI_ON		BIT_ULL(KVMLU_PI_ON_BIT)
#define KVMLU_PI_SN		BIT_ULL(KVMLU_PI_SN_BIT)
#define KVMLU_PI_CONFIG_MASK \
	((KVMLU_PI_NV_MASK << KVMLU_PI_NV_SHIFT) | \
	 (KVMLU_PI_NDST_MASK << KVMLU_PI_NDST_SHIFT))

/* Protects kvmlu_tables and kvmlu_retired. */
static DEFINE_MUTEX(kvmlu_tables_lock);
/* Every live table, via &kvmlu_table.node. */
static LIST_HEAD(kvmlu_tables);
/* The counters of the tables freed since the module was loaded. */
static struct kvmlu_stats kvmlu_retired;

static void kvmlu_stats_add(struct kvmlu_stats *sum, struct kvmlu_counters *c)
{
	struct kvmlu_stats s;

	kvmlu_counters_read(c, &s);
	sum->signals += s.signals;
	sum->posted += s.posted;
	sum->coalesced += s.coalesced;
	sum->notified += s.notified;
	sum->suppressed += s.suppressed;
}

/**
 * kvmlu_tables_totals() - what QUERY reports over all tables
 * @nr_tables: Live tables.
 * @nr_bindings: Live bindings.
 * @stats: The counters of every table since the module was loaded.
 *
 * Takes kvmlu_tables_lock, and no table's lock: each table's binding count
 * is read as it stands. May sleep.
 */
void kvmlu_tables_totals(u64 *nr_tables, u64 *nr_bindings,
			 struct kvmlu_stats *stats)
{
	struct kvmlu_table *table;

	*nr_tables = 0;
	*nr_bindings = 0;
	mutex_lock(&kvmlu_tables_lock);
	*stats = kvmlu_retired;
	list_for_each_entry(table, &kvmlu_tables, node) {
		(*nr_tables)++;
		*nr_bindings += READ_ONCE(table->nr_bindings);
		kvmlu_stats_add(stats, &table->counters);
	}
	mutex_unlock(&kvmlu_tables_lock);
}

static unsigned long *kvmlu_pir(struct kvmlu_pi_desc *desc)
{
	return (unsigned long *)desc->pir;
}

static unsigned long *kvmlu_ctl(struct kvmlu_pi_desc *desc)
{
	return (unsigned long *)&desc->control;
}

static bool kvmlu_pir_empty(struct kvmlu_pi_desc *desc)
{
	int i;

	for (i = 0; i < ARRAY_SIZE(desc->pir); i++)
		if (READ_ONCE(desc->pir[i]))
			return false;
	return true;
}

/*
 * Set ON if neither SN nor ON is set, in one compare-and-exchange of the
 * control word, so that ON is never set on the strength of an SN that has
 * been set meanwhile. Returns the control word as the step found it: ON went
 * from 0 to 1 if and only if it has neither KVMLU_PI_SN nor KVMLU_PI_ON.
 * Any context; lockless.
 */
static u64 kvmlu_raise_on(struct kvmlu_pi_desc *desc)
{
	u64 ctl = READ_ONCE(desc->control);

	do {
		if (ctl & (KVMLU_PI_SN | KVMLU_PI_ON))
			return ctl;
	} while (!try_cmpxchg64(&desc->control, &ctl, ctl | KVMLU_PI_ON));
	return ctl;
}

/*
 * Signal @v's notification target @n times, if it has one. Under RCU: a
 * target replaced meanwhile is put only after this returns. Must not be
 * called from the wakeup callback of another eventfd.
 */
static void kvmlu_signal(struct kvmlu_vcpu *v, unsigned int n)
{
	struct eventfd_ctx *ctx;

	rcu_read_lock();
	ctx = rcu_dereference(v->notify);
	if (ctx)
		kvmlu_eventfd_signal(ctx, n);
	rcu_read_unlock();
}

/* A replaced notification target, to be put after a grace period. */
struct kvmlu_notify_gone {
	struct rcu_head rcu;
	struct eventfd_ctx *ctx;
};

static void kvmlu_notify_gone_put(struct rcu_head *rcu)
{
	struct kvmlu_notify_gone *gone =
		container_of(rcu, struct kvmlu_notify_gone, rcu);

	eventfd_ctx_put(gone->ctx);
	kfree(gone);
}

static void kvmlu_notify_work(struct irq_work *work)
{
	struct kvmlu_vcpu *v = container_of(work, struct kvmlu_vcpu,
					    notify_work);
	unsigned int n = atomic_xchg(&v->deferred, 0);

	if (n)
		kvmlu_signal(v, n);
}

/*
 * Tell @vcpu's owner that ON went from 0 to 1. With @defer, or where the
 * eventfd core forbids nesting, the signal is sent from an irq_work: the
 * caller may hold another eventfd's wait-queue lock.
 */
static void kvmlu_notify(struct kvmlu_table *table, u32 vcpu, bool defer)
{
	struct kvmlu_vcpu *v = &table->vcpus[vcpu];

	if (defer || !eventfd_signal_allowed()) {
		atomic_inc(&v->deferred);
		irq_work_queue(&v->notify_work);
		return;
	}
	kvmlu_signal(v, 1);
}

/**
 * kvmlu_counters_account() - count one post
 * @c: The counters.
 * @result: What kvmlu_post() returned.
 * @count: The signals it stood for: all but the first coalesced with it.
 */
void kvmlu_counters_account(struct kvmlu_counters *c, u32 result, u64 count)
{
	bool rose = !(result & KVMLU_POST_COALESCED);

	atomic64_add(count, &c->signals);
	if (rose)
		atomic64_inc(&c->posted);
	if (count > rose)
		atomic64_add(count - rose, &c->coalesced);
	if (result & KVMLU_POST_NOTIFIED)
		atomic64_inc(&c->notified);
	if (result & KVMLU_POST_SUPPRESSED)
		atomic64_inc(&c->suppressed);
}

void kvmlu_counters_read(struct kvmlu_counters *c, struct kvmlu_stats *out)
{
	out->signals = atomic64_read(&c->signals);
	out->posted = atomic64_read(&c->posted);
	out->coalesced = atomic64_read(&c->coalesced);
	out->notified = atomic64_read(&c->notified);
	out->suppressed = atomic64_read(&c->suppressed);
}

static u32 kvmlu_post_one(struct kvmlu_table *table, u32 vcpu, u32 vector,
			  bool defer)
{
	struct kvmlu_pi_desc *desc = &table->desc[vcpu];
	u64 old;

	if (test_and_set_bit(vector, kvmlu_pir(desc)))
		return KVMLU_POST_COALESCED;
	/* The test-and-set above is fully ordered: see the file comment. */
	old = kvmlu_raise_on(desc);
	if (old & KVMLU_PI_SN)
		return KVMLU_POST_SUPPRESSED;
	if (old & KVMLU_PI_ON)
		return 0;
	kvmlu_notify(table, vcpu, defer);
	return KVMLU_POST_NOTIFIED;
}

/**
 * kvmlu_post() - post a vector to a descriptor: the posting engine
 * @table: The table.
 * @vcpu: The descriptor, below @table->nr_vcpus.
 * @vector: The vector, KVMLU_VECTOR_MIN..KVMLU_VECTOR_MAX.
 * @count: How many signals this post stands for (at least 1); all but the
 *	first coalesce with it.
 * @defer: Signal the notification target from an irq_work; set when the
 *	caller runs inside an eventfd's wakeup callback.
 *
 * Any context; takes no lock unless it signals directly. Counts the post in
 * the table's counters.
 *
 * Return: KVMLU_POST_* bits.
 */
u32 kvmlu_post(struct kvmlu_table *table, u32 vcpu, u32 vector, u64 count,
	       bool defer)
{
	u32 result = kvmlu_post_one(table, vcpu, vector, defer);

	kvmlu_counters_account(&table->counters, result, count);
	return result;
}

static void kvmlu_table_free(struct kref *ref)
{
	struct kvmlu_table *table = container_of(ref, struct kvmlu_table, ref);
	u32 i;

	mutex_lock(&kvmlu_tables_lock);
	list_del(&table->node);
	kvmlu_stats_add(&kvmlu_retired, &table->counters);
	mutex_unlock(&kvmlu_tables_lock);

	for (i = 0; i < table->nr_vcpus; i++) {
		struct kvmlu_vcpu *v = &table->vcpus[i];
		struct eventfd_ctx *ctx;

		irq_work_sync(&v->notify_work);
		/* No reference is left, so no post: no reader either. */
		ctx = rcu_dereference_protected(v->notify, true);
		if (ctx)
			eventfd_ctx_put(ctx);
	}
	WARN_ON(!list_empty(&table->bindings));
	mutex_destroy(&table->bind_lock);
	vfree(table->desc);
	kvfree(table);
}

void kvmlu_table_get(struct kvmlu_table *table)
{
	kref_get(&table->ref);
}

/**
 * kvmlu_table_put() - drop a reference on a table
 * @table: A table whose reference the caller holds (kvmlu_table_from_fd()).
 *
 * The last reference frees the table: it waits for notifications in flight
 * and puts each vCPU's notification eventfd.
 *
 * Context: process context; may sleep when it drops the last reference.
 * Return: nothing.
 */
void kvmlu_table_put(struct kvmlu_table *table)
{
	kref_put(&table->ref, kvmlu_table_free);
}
EXPORT_SYMBOL_NS_GPL(kvmlu_table_put, KVMLU_NS);

static int kvmlu_table_release(struct inode *inode, struct file *file)
{
	kvmlu_table_put(file->private_data);
	return 0;
}

static size_t kvmlu_table_bytes(const struct kvmlu_table *table)
{
	return PAGE_ALIGN(table->nr_vcpus * sizeof(struct kvmlu_pi_desc));
}

/*
 * Userspace observes the descriptors through a shared read-only mapping
 * that cannot be executed; VM_MAYWRITE and VM_MAYEXEC are dropped so that
 * mprotect() cannot make it writable or executable later. The pages are
 * those of the vmalloc area, inserted one by one.
 */
static int kvmlu_table_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct kvmlu_table *table = file->private_data;
	unsigned long len = vma->vm_end - vma->vm_start;
	unsigned long pages = kvmlu_table_bytes(table) >> PAGE_SHIFT;
	unsigned long i;
	int ret;

	if (vma->vm_flags & (VM_WRITE | VM_EXEC))
		return -EACCES;
	if (!(vma->vm_flags & VM_MAYSHARE))
		return -EINVAL;
	if (vma->vm_pgoff >= pages ||
	    len > (pages - vma->vm_pgoff) << PAGE_SHIFT)
		return -EINVAL;

	kvmlu_vma_flags(vma, VM_DONTEXPAND | VM_DONTDUMP,
			VM_MAYWRITE | VM_MAYEXEC);
	for (i = 0; i < len >> PAGE_SHIFT; i++) {
		void *page = (void *)table->desc +
			     ((vma->vm_pgoff + i) << PAGE_SHIFT);

		ret = vm_insert_page(vma, vma->vm_start + (i << PAGE_SHIFT),
				     vmalloc_to_page(page));
		if (ret)
			return ret;
	}
	return 0;
}

/*
 * A new owner takes over @vcpu: what arrived while nobody listened must
 * reach it. PIR is only read. ON is set (never cleared: a concurrent post may
 * rely on it) if SN is clear and a vector is pending; if ON is then set, the
 * new target is signalled once, even if ON was set before, because the
 * signal that set it went to the previous owner. Caller holds @table->lock.
 */
static void kvmlu_attach(struct kvmlu_table *table, u32 vcpu)
{
	struct kvmlu_pi_desc *desc = &table->desc[vcpu];
	struct eventfd_ctx *ctx;

	ctx = rcu_dereference_protected(table->vcpus[vcpu].notify,
					lockdep_is_held(&table->lock));
	/*
	 * SN and ON are decided in one step, as a post does. The caller stored
	 * the new target before this fully ordered step, and a post loads the
	 * target after its own: either this sees the post's ON, or the post
	 * sees the new target.
	 */
	if (!kvmlu_pir_empty(desc) &&
	    !(kvmlu_raise_on(desc) & (KVMLU_PI_SN | KVMLU_PI_ON)))
		atomic64_inc(&table->counters.notified);
	if ((READ_ONCE(desc->control) & KVMLU_PI_ON) && ctx)
		kvmlu_eventfd_signal(ctx, 1);
}

static int kvmlu_table_set_notify(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_table_set_notify *sn = ucmd->cmd;
	struct kvmlu_table *table = ucmd->obj;
	struct eventfd_ctx *ctx = NULL, *old;
	struct kvmlu_notify_gone *gone;
	struct kvmlu_pi_desc *desc;
	u64 ctl, cfg;

	if (sn->flags & ~KVMLU_SET_NOTIFY_FLAGS)
		return -EINVAL;
	if (sn->vcpu >= table->nr_vcpus)
		return -ERANGE;
	if (sn->nv < KVMLU_VECTOR_MIN || sn->nv > KVMLU_VECTOR_MAX)
		return -ERANGE;
	/* For the target this replaces, if any; allocated before anything. */
	gone = kmalloc(sizeof(*gone), GFP_KERNEL_ACCOUNT);
	if (!gone)
		return -ENOMEM;
	if (sn->eventfd != -1) {
		ctx = eventfd_ctx_fdget(sn->eventfd);
		if (IS_ERR(ctx)) {
			kfree(gone);
			return PTR_ERR(ctx);
		}
	}

	desc = &table->desc[sn->vcpu];
	cfg = ((u64)sn->nv << KVMLU_PI_NV_SHIFT) |
	      ((u64)sn->ndst << KVMLU_PI_NDST_SHIFT);

	spin_lock(&table->lock);
	old = rcu_replace_pointer(table->vcpus[sn->vcpu].notify, ctx,
				  lockdep_is_held(&table->lock));
	/* ON and SN change under our feet; keep whatever they are. */
	ctl = READ_ONCE(desc->control);
	while (!try_cmpxchg64(&desc->control, &ctl,
			      (ctl & ~KVMLU_PI_CONFIG_MASK) | cfg))
		;
	if (sn->flags & KVMLU_SET_NOTIFY_ATTACH)
		kvmlu_attach(table, sn->vcpu);
	spin_unlock(&table->lock);

	/* A post may still be signalling it: put it after a grace period. */
	if (old) {
		gone->ctx = old;
		call_rcu(&gone->rcu, kvmlu_notify_gone_put);
	} else {
		kfree(gone);
	}
	return 0;
}

static int kvmlu_table_set_sn(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_table_set_sn *ss = ucmd->cmd;
	struct kvmlu_table *table = ucmd->obj;
	struct kvmlu_pi_desc *desc;
	bool rose;
	u64 ctl, new;

	if (ss->flags)
		return -EINVAL;
	if (ss->vcpu >= table->nr_vcpus)
		return -ERANGE;
	if (ss->suppress > 1)
		return -EINVAL;

	desc = &table->desc[ss->vcpu];
	ctl = READ_ONCE(desc->control);
	if (ss->suppress) {
		/*
		 * One atomic step on the control word; ON stays as it is, and
		 * no post's cmpxchg sets it after this.
		 */
		set_bit(KVMLU_PI_SN_BIT, kvmlu_ctl(desc));
		return 0;
	}
	/* Clear SN, and set ON in the same step if a vector is pending. */
	do {
		new = ctl & ~KVMLU_PI_SN;
		if (!kvmlu_pir_empty(desc))
			new |= KVMLU_PI_ON;
	} while (!try_cmpxchg64(&desc->control, &ctl, new));
	rose = !(ctl & KVMLU_PI_ON) && (new & KVMLU_PI_ON);
	/*
	 * PIR looked empty before SN went. The cmpxchg is fully ordered and
	 * pairs with the test-and-set of PIR in kvmlu_post(): look again, for
	 * a post that still saw SN set (see the file comment).
	 */
	if (!(new & KVMLU_PI_ON) && !kvmlu_pir_empty(desc))
		rose = !(kvmlu_raise_on(desc) &
			 (KVMLU_PI_SN | KVMLU_PI_ON));
	if (rose) {
		atomic64_inc(&table->counters.notified);
		kvmlu_notify(table, ss->vcpu, false);
	}
	return 0;
}

static int kvmlu_table_peek(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_table_peek *pk = ucmd->cmd;
	struct kvmlu_table *table = ucmd->obj;
	struct kvmlu_pi_desc *desc;
	int i;

	if (pk->flags || pk->reserved)
		return -EINVAL;
	if (pk->vcpu >= table->nr_vcpus)
		return -ERANGE;

	desc = &table->desc[pk->vcpu];
	for (i = 0; i < ARRAY_SIZE(desc->pir); i++)
		pk->desc.pir[i] = READ_ONCE(desc->pir[i]);
	pk->desc.control = READ_ONCE(desc->control);
	memset(pk->desc.reserved, 0, sizeof(pk->desc.reserved));
	return kvmlu_ucmd_respond(ucmd, sizeof(*pk));
}

static int kvmlu_table_fetch(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_table_fetch *fe = ucmd->cmd;
	struct kvmlu_table *table = ucmd->obj;

	if (fe->flags || fe->reserved)
		return -EINVAL;
	if (fe->vcpu >= table->nr_vcpus)
		return -ERANGE;

	kvmlu_table_take_pir(table, fe->vcpu, fe->pir);
	return kvmlu_ucmd_respond(ucmd, sizeof(*fe));
}

static int kvmlu_table_post(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_table_post *po = ucmd->cmd;
	struct kvmlu_table *table = ucmd->obj;

	if (po->flags || po->reserved)
		return -EINVAL;
	if (po->vcpu >= table->nr_vcpus)
		return -ERANGE;
	if (po->vector < KVMLU_VECTOR_MIN || po->vector > KVMLU_VECTOR_MAX)
		return -ERANGE;

	po->result = kvmlu_post(table, po->vcpu, po->vector, 1, false);
	return kvmlu_ucmd_respond(ucmd, sizeof(*po));
}

static int kvmlu_table_info(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_table_info *ti = ucmd->cmd;
	struct kvmlu_table *table = ucmd->obj;

	if (ti->flags)
		return -EINVAL;
	ti->nr_vcpus = table->nr_vcpus;
	ti->nr_bindings = READ_ONCE(table->nr_bindings);
	kvmlu_counters_read(&table->counters, &ti->stats);
	return kvmlu_ucmd_respond(ucmd, sizeof(*ti));
}

const struct kvmlu_ioctl_op kvmlu_table_ops[] = {
	KVMLU_IOCTL_OP_IN(KVMLU_TABLE_CMD_BASE, KVMLU_TABLE_SET_NOTIFY,
			  kvmlu_table_set_notify, struct kvmlu_table_set_notify,
			  ndst),
	KVMLU_IOCTL_OP_IN(KVMLU_TABLE_CMD_BASE, KVMLU_TABLE_SET_SN,
			  kvmlu_table_set_sn, struct kvmlu_table_set_sn,
			  suppress),
	KVMLU_IOCTL_OP(KVMLU_TABLE_CMD_BASE, KVMLU_TABLE_PEEK,
		       kvmlu_table_peek, struct kvmlu_table_peek, desc),
	KVMLU_IOCTL_OP(KVMLU_TABLE_CMD_BASE, KVMLU_TABLE_FETCH,
		       kvmlu_table_fetch, struct kvmlu_table_fetch, pir),
	KVMLU_IOCTL_OP(KVMLU_TABLE_CMD_BASE, KVMLU_TABLE_POST,
		       kvmlu_table_post, struct kvmlu_table_post, reserved),
	KVMLU_IOCTL_OP(KVMLU_TABLE_CMD_BASE, KVMLU_TABLE_BIND,
		       kvmlu_table_bind, struct kvmlu_table_bind, fd),
	KVMLU_IOCTL_OP(KVMLU_TABLE_CMD_BASE, KVMLU_TABLE_INFO,
		       kvmlu_table_info, struct kvmlu_table_info, stats),
};

const size_t kvmlu_nr_table_ops = ARRAY_SIZE(kvmlu_table_ops);

static long kvmlu_table_ioctl(struct file *file, unsigned int cmd,
			      unsigned long arg)
{
	return kvmlu_ioctl_dispatch(kvmlu_table_ops, kvmlu_nr_table_ops,
				    KVMLU_TABLE_CMD_BASE, cmd, arg,
				    file->private_data);
}

static const struct file_operations kvmlu_table_fops = {
	.owner = THIS_MODULE,
	.release = kvmlu_table_release,
	.unlocked_ioctl = kvmlu_table_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.mmap = kvmlu_table_mmap,
	.llseek = noop_llseek,
};

bool kvmlu_is_table_file(struct file *file)
{
	return file->f_op == &kvmlu_table_fops;
}

/*
 * The in-kernel interface for the vAPIC modules. Each takes or holds a
 * reference on the table, never on a file: a vAPIC keeps its table alive
 * however the table's fds come and go.
 */

/**
 * kvmlu_table_from_fd() - the table behind a file descriptor
 * @fd: A file descriptor of the calling process.
 *
 * Context: process context (it looks @fd up in the current task's table).
 * Return: the table with a reference taken (drop it with kvmlu_table_put()),
 * ERR_PTR(-EBADF) if @fd is not open, ERR_PTR(-EINVAL) if it is not a table.
 */
struct kvmlu_table *kvmlu_table_from_fd(int fd)
{
	struct kvmlu_table *table;
	struct file *file = fget(fd);

	if (!file)
		return ERR_PTR(-EBADF);
	if (!kvmlu_is_table_file(file)) {
		fput(file);
		return ERR_PTR(-EINVAL);
	}
	table = file->private_data;
	kvmlu_table_get(table);
	fput(file);
	return table;
}
EXPORT_SYMBOL_NS_GPL(kvmlu_table_from_fd, KVMLU_NS);

/**
 * kvmlu_table_nr_vcpus() - the number of descriptors of a table
 * @table: The table.
 *
 * Context: any context.
 * Return: the vCPU count, fixed when the table was created.
 */
u32 kvmlu_table_nr_vcpus(struct kvmlu_table *table)
{
	return table->nr_vcpus;
}
EXPORT_SYMBOL_NS_GPL(kvmlu_table_nr_vcpus, KVMLU_NS);

/**
 * kvmlu_table_take_pir() - take a vCPU's pending vectors, as FETCH does
 * @table: The table.
 * @vcpu: The vCPU, below kvmlu_table_nr_vcpus().
 * @pir: Where to put the four PIR words taken.
 *
 * Clears ON, then exchanges each PIR word with zero (see the file comment).
 *
 * Context: any context; takes no lock.
 * Return: 0, or -ERANGE (with @pir zeroed and no descriptor touched) for a
 * @vcpu at or beyond the table's vCPU count.
 */
int kvmlu_table_take_pir(struct kvmlu_table *table, u32 vcpu, u64 pir[4])
{
	struct kvmlu_pi_desc *desc;
	int i;

	if (vcpu >= table->nr_vcpus) {
		memset(pir, 0, 4 * sizeof(*pir));
		return -ERANGE;
	}
	desc = &table->desc[vcpu];
	clear_bit(KVMLU_PI_ON_BIT, kvmlu_ctl(desc));
	/* ON is clear before any PIR word is taken: see the file comment. */
	smp_mb__after_atomic();
	for (i = 0; i < ARRAY_SIZE(desc->pir); i++)
		pir[i] = xchg(&desc->pir[i], 0);
	return 0;
}
EXPORT_SYMBOL_NS_GPL(kvmlu_table_take_pir, KVMLU_NS);

/**
 * kvmlu_table_create() - allocate a table and the file that owns it
 * @nr_vcpus: Descriptors, 1..KVMLU_MAX_VCPUS (checked by the caller).
 * @filep: Where to store the new file.
 *
 * Return: 0 or a negative errno.
 */
int kvmlu_table_create(u32 nr_vcpus, struct file **filep)
{
	struct kvmlu_table *table;
	struct file *file;
	u32 i;
	int ret;

	table = kvzalloc(struct_size(table, vcpus, nr_vcpus), GFP_KERNEL_ACCOUNT);
	if (!table)
		return -ENOMEM;
	kref_init(&table->ref);
	spin_lock_init(&table->lock);
	mutex_init(&table->bind_lock);
	INIT_LIST_HEAD(&table->bindings);
	table->nr_vcpus = nr_vcpus;
	/*
	 * Page-aligned and never moved, charged to the creator's memory cgroup,
	 * from order-0 pages: only each descriptor must lie within one page.
	 */
	table->desc = __vmalloc(kvmlu_table_bytes(table),
				GFP_KERNEL_ACCOUNT | __GFP_ZERO);
	if (!table->desc) {
		ret = -ENOMEM;
		goto err_free_table;
	}
	for (i = 0; i < nr_vcpus; i++)
		init_irq_work(&table->vcpus[i].notify_work, kvmlu_notify_work);

	file = anon_inode_getfile("[kvmlu-table]", &kvmlu_table_fops, table,
				  O_RDWR);
	if (IS_ERR(file)) {
		ret = PTR_ERR(file);
		goto err_free_desc;
	}
	mutex_lock(&kvmlu_tables_lock);
	list_add_tail(&table->node, &kvmlu_tables);
	mutex_unlock(&kvmlu_tables_lock);
	*filep = file;
	return 0;

err_free_desc:
	vfree(table->desc);
err_free_table:
	kvfree(table);
	return ret;
}
