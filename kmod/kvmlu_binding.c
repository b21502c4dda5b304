// SPDX-License-Identifier: GPL-2.0
/*
 * kvmlu: IRQ bindings, an eventfd bound to (table, vCPU, vector).
 *
 * A binding hooks the eventfd's wait queue the way KVM's irqfd does. When a
 * device's MSI handler (VFIO's, for a passthrough device) signals the
 * eventfd, the wakeup callback runs in that context, with the eventfd's
 * wait-queue lock held and interrupts off: it drains the counter and posts
 * through the engine, deferring the notification signal to an irq_work.
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
#include <linux/poll.h>
#include <linux/slab.h>
#include <linux/wait.h>

#include "kvmlu_internal.h"

/**
 * struct kvmlu_binding - an eventfd bound to a descriptor and a vector
 * @table: The table posted to; the binding holds a reference.
 * @eventfd: The eventfd's context; the binding holds a reference.
 * @vcpu: The descriptor posted to. Fixed.
 * @vector: The vector posted. Fixed.
 * @wait: Our entry in the eventfd's wait queue. Queued and unqueued under
 *	the wait-queue head's lock (@wqh->lock).
 * @wqh: The eventfd's wait-queue head, found when polling at bind time.
 * @pt: The poll table used once, at bind time, to find @wqh.
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
 * The eventfd's wakeup callback: runs with @wait's wait-queue lock held,
 * often in hard interrupt context (VFIO's MSI handler signals from there).
 */
static int kvmlu_binding_wakeup(wait_queue_entry_t *wait, unsigned int mode,
				int sync, void *key)
{
	struct kvmlu_binding *b = container_of(wait, struct kvmlu_binding, wait);
	__poll_t flags = key_to_poll(key);
	u64 count;

	if (flags & EPOLLIN) {
		eventfd_ctx_do_read(b->eventfd, &count);
		if (count)
			kvmlu_binding_fire(b, count, true);
	}
	if (flags & EPOLLHUP) {
		/* The context stays (we hold it); stop listening to it. */
		__remove_wait_queue(b->wqh, &b->wait);
		WRITE_ONCE(b->hup, true);
	}
	return 0;
}

static void kvmlu_binding_queue(struct file *file, wait_queue_head_t *wqh,
				poll_table *pt)
{
	struct kvmlu_binding *b = container_of(pt, struct kvmlu_binding, pt);

	b->wqh = wqh;
	add_wait_queue(wqh, &b->wait);
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

/* Is @ctx bound to @table already? Caller holds &kvmlu_table.bind_lock. */
static bool kvmlu_table_has_eventfd(struct kvmlu_table *table,
				    struct eventfd_ctx *ctx)
{
	struct kvmlu_binding *b;

	lockdep_assert_held(&table->bind_lock);
	list_for_each_entry(b, &table->bindings, link)
		if (b->eventfd == ctx)
			return true;
	return false;
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
	__poll_t events;
	u64 count = 0;
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

	mutex_lock(&table->bind_lock);
	if (kvmlu_table_has_eventfd(table, b->eventfd)) {
		mutex_unlock(&table->bind_lock);
		ret = -EBUSY;
		goto err_put_file;
	}
	tb->fd = fd;
	ret = kvmlu_ucmd_respond(ucmd, sizeof(*tb));
	if (ret) {
		mutex_unlock(&table->bind_lock);
		goto err_put_file;
	}
	kvmlu_table_get(table);
	list_add_tail(&b->link, &table->bindings);
	WRITE_ONCE(table->nr_bindings, table->nr_bindings + 1);
	b->attached = true;

	/*
	 * Hook the wait queue, then take what was signalled before: under the
	 * wait-queue lock, so a signal is drained either here or by the
	 * callback, never both.
	 */
	events = vfs_poll(efile, &b->pt);
	if (events & EPOLLIN) {
		spin_lock_irq(&b->wqh->lock);
		eventfd_ctx_do_read(b->eventfd, &count);
		spin_unlock_irq(&b->wqh->lock);
	}
	mutex_unlock(&table->bind_lock);

	if (count)
		kvmlu_binding_fire(b, count, false);
	fput(efile);
	fd_install(fd, file);
	return 0;

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
