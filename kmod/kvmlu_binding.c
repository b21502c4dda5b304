// SPDX-License-Identifier: GPL-2.0
/*
 * kvmlu: IRQ bindings, an eventfd bound to (table, vCPU, vector).
 *
 * A binding hooks the eventfd's wait queue the way KVM's irqfd does: as a
 * priority, exclusive waiter, first in the queue. When a device's MSI
 * handler (VFIO's, for a passthrough device) signals the eventfd, the wakeup
 * callback runs in that context, with the eventfd's wait-queue lock held and
 * interrupts off: it drains the counter, posts through the engine (deferring
 * the notification signal to an irq_work) and returns 1, which ends the
 * wakeup there. Ordinary waiters (a poll() or epoll on the eventfd) are not
 * woken for a count the binding took.
 *
 * Only one priority waiter can own an eventfd's counts: the first one queued
 * takes every signal. BIND therefore refuses an eventfd whose wait queue has
 * a priority waiter already (another binding, of any table, or a KVM irqfd),
 * checked and queued in one hold of the wait-queue lock.
 *
 * BIND also refuses an EFD_SEMAPHORE eventfd, whose reads take one count at
 * a time. Its flags are private to fs/eventfd.c, so BIND finds out by
 * behaviour: once queued, it signals the eventfd by 2 itself and its
 * callback, which runs at once under the lock with a counter of 2 or more,
 * reads it twice. A second read that finds a count is a semaphore's. Nobody
 * else sees those 2 counts: the callback takes them and ends the wakeup
 * before anyone else is woken, and BIND subtracts them from what it posts.
 *
 * Lifetime: the binding file owns the binding. The binding holds a reference
 * on its table (so a closed table is never posted into after it is freed) and
 * on the eventfd's context (so its wait queue outlives the eventfd's file).
 * When the eventfd's last file reference goes, the callback sees EPOLLHUP and
 * unhooks itself; the binding stays, inactive, until its fd is closed.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/anon_inodes.h>
#include <linux/eventfd.h>
#include <linux/file.h>
#include <linux/overflow.h>
#include <linux/poll.h>
#include <linux/slab.h>
#include <linux/wait.h>

#include "kvmlu_compat.h"
#include "kvmlu_internal.h"

/**
 * enum kvmlu_binding_state - where a binding is in its life
 * @KVMLU_BINDING_PROBING: BIND queued it and has not decided: the callback
 *	ends each wakeup and leaves the count, for BIND's probe or for the read
 *	that starts the posting; it posts nothing.
 * @KVMLU_BINDING_POSTING: BIND succeeded: the callback posts.
 * @KVMLU_BINDING_REFUSED: BIND failed: the callback leaves the eventfd alone
 *	until BIND unqueues it.
 */
enum kvmlu_binding_state {
	KVMLU_BINDING_PROBING,
	KVMLU_BINDING_POSTING,
	KVMLU_BINDING_REFUSED,
};

/**
 * struct kvmlu_binding - an eventfd bound to a descriptor and a vector
 * @table: The table posted to; the binding holds a reference.
 * @eventfd: The eventfd's context; the binding holds a reference.
 * @vcpu: The descriptor posted to. Fixed.
 * @vector: The vector posted. Fixed.
 * @wait: Our entry in the eventfd's wait queue, a priority, exclusive one.
 *	Queued and unqueued under the wait-queue head's lock (@wqh->lock).
 * @wqh: The eventfd's wait-queue head, found when polling at bind time.
 * @pt: The poll table used once, at bind time, to find @wqh.
 * @queued: @wait was queued at bind time. Set once, before BIND reads it.
 * @state: A &enum kvmlu_binding_state, under @wqh->lock.
 * @early: Counts BIND's probe read, its own 2 included; under @wqh->lock.
 * @semaphore: The probe's second read found a count: an EFD_SEMAPHORE
 *	eventfd. Under @wqh->lock.
 * @drains: The probe's first read took 2 or more at once: not a semaphore.
 *	Under @wqh->lock.
 * @attached: On the table's list and hooked to the eventfd; set once at
 *	bind time, under &kvmlu_table.bind_lock, before the fd is installed.
 * @hup: Set by the wakeup callback, under @wqh->lock, when the eventfd's
 *	file went away and @wait was unqueued.
 * @counters: This binding's counters.
 * @link: Entry in &kvmlu_table.bindings, under &kvmlu_table.bind_lock.
 */
struct kvmlu_binding {
	struct kvmlu_table *table;
	struct eventfd_ctx *eventfd;
	u32 vcpu;
	u32 vector;
	wait_queue_entry_t wait;
	wait_queue_head_t *wqh;
	poll_table pt;
	bool queued;
	enum kvmlu_binding_state state;
	u64 early;
	bool semaphore;
	bool drains;
	bool attached;
	bool hup;
	struct kvmlu_counters counters;
	struct list_head link;
};

/* Post @count signals; any context. */
static void kvmlu_binding_fire(struct kvmlu_binding *b, u64 count, bool defer)
{
	u32 result = kvmlu_post(b->table, b->vcpu, b->vector, count, defer);

	kvmlu_counters_account(&b->counters, result, count);
}

/*
 * BIND's probe, after it added 2 to the counter: take the counter with up
 * to two reads and learn the eventfd's kind. A read empties a counter
 * unless the eventfd is a semaphore, which gives 1 a read; so a second read
 * that finds a count proves a semaphore, and a first read of 2 or more
 * proves the other kind. Called under @b->wqh->lock.
 */
static void kvmlu_binding_probe(struct kvmlu_binding *b)
{
	u64 first, second = 0;

	eventfd_ctx_do_read(b->eventfd, &first);
	if (first == 1)
		eventfd_ctx_do_read(b->eventfd, &second);
	if (check_add_overflow(b->early, first + second, &b->early))
		b->early = U64_MAX;
	if (second)
		b->semaphore = true;
	else if (first >= 2)
		b->drains = true;
}

/*
 * The eventfd's wakeup callback: runs with @wait's wait-queue lock held,
 * often in hard interrupt context (VFIO's MSI handler signals from there).
 * Returning 1 for EPOLLIN ends the wakeup at this priority, exclusive
 * waiter: the count is ours. Returning 0 for EPOLLHUP lets every other
 * waiter (a KVM irqfd queued behind us) see the eventfd go.
 */
static int kvmlu_binding_wakeup(wait_queue_entry_t *wait, unsigned int mode,
				int sync, void *key)
{
	struct kvmlu_binding *b = container_of(wait, struct kvmlu_binding, wait);
	__poll_t flags = key_to_poll(key);
	int consumed = 0;
	u64 count;

	if (flags & EPOLLIN) {
		switch (b->state) {
		case KVMLU_BINDING_PROBING:
			/*
			 * The count stays for BIND's probe, or for the
			 * read that ends it; nobody else is woken.
			 */
			consumed = 1;
			break;
		case KVMLU_BINDING_POSTING:
			eventfd_ctx_do_read(b->eventfd, &count);
			if (count)
				kvmlu_binding_fire(b, count, true);
			consumed = 1;
			break;
		case KVMLU_BINDING_REFUSED:
			break;
		}
	}
	if (flags & EPOLLHUP) {
		/* The context stays (we hold it); stop listening to it. */
		__remove_wait_queue(b->wqh, &b->wait);
		WRITE_ONCE(b->hup, true);
	}
	return consumed;
}

/*
 * The eventfd's poll queues us here, once, at bind time. Queue @b->wait as
 * the first priority waiter unless the queue has one: the check and the
 * queueing are one hold of the lock, so two BINDs (or a BIND and a
 * KVM_IRQFD) cannot both find the queue free.
 */
static void kvmlu_binding_queue(struct file *file, wait_queue_head_t *wqh,
				poll_table *pt)
{
	struct kvmlu_binding *b = container_of(pt, struct kvmlu_binding, pt);
	wait_queue_entry_t *curr;
	unsigned long flags;

	b->wqh = wqh;
	spin_lock_irqsave(&wqh->lock, flags);
	list_for_each_entry(curr, &wqh->head, entry)
		if (curr->flags & WQ_FLAG_PRIORITY)
			goto out;
	b->wait.flags |= WQ_FLAG_EXCLUSIVE | WQ_FLAG_PRIORITY;
	__add_wait_queue(wqh, &b->wait);
	b->queued = true;
out:
	spin_unlock_irqrestore(&wqh->lock, flags);
}

/* Did the probe find an eventfd whose reads drain it? */
static bool kvmlu_binding_drains(struct kvmlu_binding *b)
{
	bool drains;

	spin_lock_irq(&b->wqh->lock);
	drains = b->drains && !b->semaphore;
	spin_unlock_irq(&b->wqh->lock);
	return drains;
}

/*
 * End the probe: switch @b to @state and return the counts the probe took
 * that were not BIND's @added. A binding that starts posting first takes
 * what came since the probe (the callback left it in the counter); a
 * refused one leaves the queue. Either happens in the same hold of the lock
 * as the switch, so no signal falls between.
 */
static u64 kvmlu_binding_settle(struct kvmlu_binding *b, u64 added,
				enum kvmlu_binding_state state)
{
	u64 early, since = 0;

	spin_lock_irq(&b->wqh->lock);
	b->state = state;
	if (state == KVMLU_BINDING_POSTING && !b->hup)
		eventfd_ctx_do_read(b->eventfd, &since);
	if (state == KVMLU_BINDING_REFUSED && !b->hup)
		__remove_wait_queue(b->wqh, &b->wait);
	early = b->early;
	spin_unlock_irq(&b->wqh->lock);
	early = early > added ? early - added : 0;
	if (check_add_overflow(early, since, &early))
		early = U64_MAX;
	return early;
}

/* Unhook from the eventfd unless EPOLLHUP did already. */
static void kvmlu_binding_unhook(struct kvmlu_binding *b)
{
	unsigned long flags;

	spin_lock_irqsave(&b->wqh->lock, flags);
	if (!b->hup)
		__remove_wait_queue(b->wqh, &b->wait);
	spin_unlock_irqrestore(&b->wqh->lock, flags);
}

static int kvmlu_binding_release(struct inode *inode, struct file *file)
{
	struct kvmlu_binding *b = file->private_data;
	struct kvmlu_table *table = b->table;

	if (b->attached) {
		mutex_lock(&table->bind_lock);
		list_del(&b->link);
		WRITE_ONCE(table->nr_bindings, table->nr_bindings - 1);
		mutex_unlock(&table->bind_lock);
		/* After this no callback runs for @b; a notification may. */
		kvmlu_binding_unhook(b);
		/* The table's release waits for its notification irq_works. */
		kvmlu_table_put(table);
	}
	eventfd_ctx_put(b->eventfd);
	kfree(b);
	return 0;
}

static int kvmlu_binding_info(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_binding_info *bi = ucmd->cmd;
	struct kvmlu_binding *b = ucmd->obj;

	if (bi->flags)
		return -EINVAL;
	bi->vcpu = b->vcpu;
	bi->vector = b->vector;
	bi->state = READ_ONCE(b->hup) ? KVMLU_BINDING_HUP : KVMLU_BINDING_ACTIVE;
	bi->reserved = 0;
	kvmlu_counters_read(&b->counters, &bi->stats);
	return kvmlu_ucmd_respond(ucmd, sizeof(*bi));
}

static const struct kvmlu_ioctl_op kvmlu_binding_ops[] = {
	KVMLU_IOCTL_OP(KVMLU_BINDING_CMD_BASE, KVMLU_BINDING_INFO,
		       kvmlu_binding_info, struct kvmlu_binding_info, stats),
};

static long kvmlu_binding_ioctl(struct file *file, unsigned int cmd,
				unsigned long arg)
{
	return kvmlu_ioctl_dispatch(kvmlu_binding_ops,
				    ARRAY_SIZE(kvmlu_binding_ops),
				    KVMLU_BINDING_CMD_BASE, cmd, arg,
				    file->private_data);
}

static const struct file_operations kvmlu_binding_fops = {
	.owner = THIS_MODULE,
	.release = kvmlu_binding_release,
	.unlocked_ioctl = kvmlu_binding_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

bool kvmlu_is_binding_file(struct file *file)
{
	return file->f_op == &kvmlu_binding_fops;
}

/**
 * kvmlu_table_bind() - KVMLU_TABLE_BIND
 * @ucmd: The command, on a table.
 *
 * Return: 0 with the binding's fd in the reply, or a negative errno.
 */
int kvmlu_table_bind(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_table_bind *tb = ucmd->cmd;
	struct kvmlu_table *table = ucmd->obj;
	struct kvmlu_binding *b;
	struct file *efile, *file;
	u64 added, count;
	int fd, ret;

	if (tb->flags)
		return -EINVAL;
	if (tb->vcpu >= table->nr_vcpus)
		return -ERANGE;
	if (tb->vector < KVMLU_VECTOR_MIN || tb->vector > KVMLU_VECTOR_MAX)
		return -ERANGE;

	efile = fget(tb->eventfd);
	if (!efile)
		return -EBADF;
	b = kzalloc(sizeof(*b), GFP_KERNEL_ACCOUNT);
	if (!b) {
		ret = -ENOMEM;
		goto err_put_efile;
	}
	b->eventfd = eventfd_ctx_fileget(efile);
	if (IS_ERR(b->eventfd)) {
		ret = PTR_ERR(b->eventfd);
		goto err_free;
	}
	b->table = table;
	b->vcpu = tb->vcpu;
	b->vector = tb->vector;
	INIT_LIST_HEAD(&b->link);
	init_waitqueue_func_entry(&b->wait, kvmlu_binding_wakeup);
	init_poll_funcptr(&b->pt, kvmlu_binding_queue);

	fd = get_unused_fd_flags(O_CLOEXEC);
	if (fd < 0) {
		ret = fd;
		goto err_put_ctx;
	}
	file = anon_inode_getfile("[kvmlu-binding]", &kvmlu_binding_fops, b,
				  O_RDWR);
	if (IS_ERR(file)) {
		ret = PTR_ERR(file);
		goto err_put_fd;
	}

	/* Queue @b as the eventfd's first waiter, or find that place taken. */
	vfs_poll(efile, &b->pt);
	if (!b->queued) {
		ret = b->wqh ? -EBUSY : -EINVAL;
		goto err_put_file;
	}
	/*
	 * Learn whether the eventfd is a semaphore: add 2 (the callback leaves
	 * them, and wakes nobody else), then read them back with whatever was
	 * pending.
	 */
	added = kvmlu_eventfd_signal(b->eventfd, 2);
	spin_lock_irq(&b->wqh->lock);
	if (!b->hup)
		kvmlu_binding_probe(b);
	spin_unlock_irq(&b->wqh->lock);
	if (!kvmlu_binding_drains(b)) {
		ret = -EINVAL;
		goto err_refuse;
	}
	tb->fd = fd;
	ret = kvmlu_ucmd_respond(ucmd, sizeof(*tb));
	if (ret)
		goto err_refuse;

	kvmlu_table_get(table);
	mutex_lock(&table->bind_lock);
	list_add_tail(&b->link, &table->bindings);
	WRITE_ONCE(table->nr_bindings, table->nr_bindings + 1);
	b->attached = true;
	mutex_unlock(&table->bind_lock);

	/*
	 * From here the callback posts. What it took while BIND probed (a
	 * count pending at BIND, signals since) is posted here, once.
	 */
	count = kvmlu_binding_settle(b, added, KVMLU_BINDING_POSTING);
	if (count)
		kvmlu_binding_fire(b, count, false);
	fput(efile);
	fd_install(fd, file);
	return 0;

err_refuse:
	/* Unqueue, and give the eventfd back the counts the probe took. */
	count = kvmlu_binding_settle(b, added, KVMLU_BINDING_REFUSED);
	if (count)
		kvmlu_eventfd_signal(b->eventfd, count);
err_put_file:
	/* The file owns @b now; its release frees @b and the context. */
	fput(file);
	put_unused_fd(fd);
	fput(efile);
	return ret;
err_put_fd:
	put_unused_fd(fd);
err_put_ctx:
	eventfd_ctx_put(b->eventfd);
err_free:
	kfree(b);
err_put_efile:
	fput(efile);
	return ret;
}
