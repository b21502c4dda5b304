// SPDX-License-Identifier: GPL-2.0
/*
 * kvmlu: the persistent base module.
 *
 * /dev/kvmlu creates descriptor tables and sessions. Each object is an
 * anonymous-inode file that holds a reference on this module, and so does
 * each session until it is finished, so the module cannot be unloaded while
 * any object or preserved session exists: delete_module() fails with EBUSY.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/file.h>
#include <linux/fs.h>
#include <linux/highmem.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/uaccess.h>

#include "kvmlu_internal.h"

/*
 * Pin the user pages that @len bytes of reply at @ucmd->ubuffer cover,
 * writable, faulting them in as a write would (a userfaultfd-registered page
 * stalls here, before the command has done anything). Takes no lock.
 */
static int kvmlu_ucmd_pin_reply(struct kvmlu_ucmd *ucmd, size_t len)
{
	unsigned long start = (unsigned long)ucmd->ubuffer;
	unsigned long first = start >> PAGE_SHIFT;
	unsigned long last = (start + len - 1) >> PAGE_SHIFT;
	int nr = last - first + 1;
	int ret;

	if (WARN_ON_ONCE(nr > KVMLU_REPLY_MAX_PAGES))
		return -EINVAL;
	ret = pin_user_pages_fast(start & PAGE_MASK, nr, FOLL_WRITE,
				  ucmd->reply_pages);
	if (ret == nr) {
		ucmd->nr_reply_pages = nr;
		return 0;
	}
	if (ret > 0)
		unpin_user_pages(ucmd->reply_pages, ret);
	return ret < 0 ? ret : -EFAULT;
}

/**
 * kvmlu_kapi_version() - the version of the interface this kvmlu.ko exports
 *
 * A vAPIC module compares it with the %KVMLU_KAPI_VERSION it was built with
 * and refuses to load on any other: the symbol CRCs do not cover everything
 * the two modules share (see kvmlu_internal.h).
 *
 * Context: any context.
 * Return: %KVMLU_KAPI_VERSION as this module was built.
 */
unsigned int kvmlu_kapi_version(void)
{
	return KVMLU_KAPI_VERSION;
}
EXPORT_SYMBOL_NS_GPL(kvmlu_kapi_version, KVMLU_NS);

/**
 * kvmlu_ioctl_ops_check() - admit another module's dispatch table
 * @owner: The module that owns @ops, for the log.
 * @ops: The table, as it will be passed to kvmlu_ioctl_dispatch().
 * @nr_ops: Entries in @ops.
 * @base: The number of the first command in @ops.
 *
 * kvmlu_ioctl_dispatch() copies each command into a buffer on this module's
 * stack, as large as this module's build of union kvmlu_ucmd_buffer; the
 * size of a command comes from @ops, which another module's build filled.
 * Each module that dispatches through kvmlu_ioctl_dispatch() calls this
 * from its init, before it registers any file that does, and fails to load
 * if it refuses: a module whose commands grew is stopped at insmod, while
 * the module it was to replace still runs, rather than overrunning the
 * stack on its first ioctl. Entries without a handler (holes) are skipped.
 *
 * Context: process context. Takes no lock.
 * Return: 0; -EOVERFLOW if a command's structure is larger than this
 * module's buffer, -EINVAL for an entry that contradicts itself (another
 * ioctl type or number than its place in @ops says, or a minimum size below
 * the size field or above the structure's size). Either is logged once.
 */
int kvmlu_ioctl_ops_check(const char *owner, const struct kvmlu_ioctl_op *ops,
			  size_t nr_ops, unsigned int base)
{
	size_t i;

	for (i = 0; i < nr_ops; i++) {
		const struct kvmlu_ioctl_op *op = &ops[i];

		if (!op->execute)
			continue;
		if (op->size > sizeof(union kvmlu_ucmd_buffer)) {
			pr_err("%s: command 0x%x takes %u bytes, this kvmlu.ko's buffer %zu\n",
			       owner, _IOC_NR(op->ioctl_num), op->size,
			       sizeof(union kvmlu_ucmd_buffer));
			return -EOVERFLOW;
		}
		if (_IOC_TYPE(op->ioctl_num) != KVMLU_IOCTL_TYPE ||
		    _IOC_NR(op->ioctl_num) != base + i ||
		    op->min_size < sizeof(u32) || op->min_size > op->size) {
			pr_err("%s: dispatch entry %zu (ioctl 0x%x) is inconsistent\n",
			       owner, i, op->ioctl_num);
			return -EINVAL;
		}
	}
	return 0;
}
EXPORT_SYMBOL_NS_GPL(kvmlu_ioctl_ops_check, KVMLU_NS);

/**
 * kvmlu_ioctl_dispatch() - run one ioctl through a dispatch table
 * @ops: The file's commands, indexed by ioctl number minus @base. A table
 *	of another module must have passed kvmlu_ioctl_ops_check().
 * @nr_ops: Entries in @ops.
 * @base: The number of the first command in @ops.
 * @cmd: The ioctl request.
 * @arg: The user's argument.
 * @obj: The file's object, passed to the handler.
 *
 * Validates the request number and the size, copies the argument in with
 * copy_struct_from_user() (E2BIG for a non-zero unknown tail) and calls the
 * handler. For a command with a reply, the user's structure is first pinned
 * writable: a reply that cannot be written (a read-only page, a structure
 * that runs into one, an address that is not ordinary memory) is EFAULT
 * before the handler runs, so a command never acts and then fails to tell
 * the caller what it did. The pages stay pinned until the handler returns.
 *
 * Context: process context; may sleep. Takes no lock of its own.
 * Return: the handler's result or a negative errno.
 */
long kvmlu_ioctl_dispatch(const struct kvmlu_ioctl_op *ops, size_t nr_ops,
			  unsigned int base, unsigned int cmd,
			  unsigned long arg, void *obj)
{
	union kvmlu_ucmd_buffer buf;
	const struct kvmlu_ioctl_op *op;
	struct kvmlu_ucmd ucmd = {
		.ubuffer = (void __user *)arg,
		.cmd = &buf,
		.obj = obj,
	};
	unsigned int nr = _IOC_NR(cmd);
	int ret;

	if (_IOC_TYPE(cmd) != KVMLU_IOCTL_TYPE || nr < base ||
	    nr - base >= nr_ops)
		return -ENOTTY;
	op = &ops[nr - base];
	if (op->ioctl_num != cmd)
		return -ENOTTY;

	ret = get_user(ucmd.user_size, (u32 __user *)ucmd.ubuffer);
	if (ret)
		return ret;
	if (ucmd.user_size < op->min_size)
		return -EINVAL;
	ret = copy_struct_from_user(&buf, op->size, ucmd.ubuffer,
				    ucmd.user_size);
	if (ret)
		return ret;
	if (op->reply) {
		ret = kvmlu_ucmd_pin_reply(&ucmd, min_t(size_t, op->size,
							ucmd.user_size));
		if (ret)
			return ret;
	}
	ret = op->execute(&ucmd);
	if (ucmd.nr_reply_pages)
		unpin_user_pages_dirty_lock(ucmd.reply_pages,
					    ucmd.nr_reply_pages, ucmd.replied);
	return ret;
}
EXPORT_SYMBOL_NS_GPL(kvmlu_ioctl_dispatch, KVMLU_NS);

/**
 * kvmlu_ucmd_respond() - write a command's output fields back to the user
 * @ucmd: The command; its dispatch entry has @reply set.
 * @size: sizeof() the command's structure.
 *
 * Writes no more than the user passed in, so an older caller with a shorter
 * structure gets the fields it knows. The destination was pinned by the
 * dispatcher: this cannot fault or sleep on user memory, so it may be called
 * under any mutex or spinlock, and after the command has acted.
 *
 * Context: any context that may call kmap_local_page().
 * Return: 0, or -EFAULT for a command declared without a reply (a bug).
 */
int kvmlu_ucmd_respond(struct kvmlu_ucmd *ucmd, size_t size)
{
	size_t len = min_t(size_t, size, ucmd->user_size);
	size_t off = offset_in_page(ucmd->ubuffer);
	const u8 *src = ucmd->cmd;
	unsigned int i;

	if (WARN_ON_ONCE(!ucmd->nr_reply_pages))
		return -EFAULT;
	for (i = 0; len && i < ucmd->nr_reply_pages; i++) {
		size_t n = min_t(size_t, len, PAGE_SIZE - off);

		memcpy_to_page(ucmd->reply_pages[i], off, src, n);
		src += n;
		len -= n;
		off = 0;
	}
	ucmd->replied = true;
	return 0;
}
EXPORT_SYMBOL_NS_GPL(kvmlu_ucmd_respond, KVMLU_NS);

/**
 * kvmlu_ucmd_reply_fd() - give the user a new file descriptor in the reply
 * @ucmd: The command; its structure already holds @fd in its fd field.
 * @size: sizeof() the command's structure.
 * @fd: A descriptor from get_unused_fd_flags().
 * @file: The new object's file.
 *
 * Writes the reply and only then installs @file at @fd, so that userspace
 * never has a descriptor it was not told about. The reply was pinned before
 * the command ran and cannot fail; should it all the same, @file is released
 * (its release undoes what it owns) and @fd returned unused.
 *
 * Context: process context, as the dispatcher calls handlers; any lock may
 * be held (the reply is pinned), but the release of @file on failure may
 * sleep.
 * Return: 0 or -EFAULT.
 */
int kvmlu_ucmd_reply_fd(struct kvmlu_ucmd *ucmd, size_t size, int fd,
			struct file *file)
{
	int ret = kvmlu_ucmd_respond(ucmd, size);

	if (ret) {
		fput(file);
		put_unused_fd(fd);
		return ret;
	}
	fd_install(fd, file);
	return 0;
}
EXPORT_SYMBOL_NS_GPL(kvmlu_ucmd_reply_fd, KVMLU_NS);

static int kvmlu_query(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_query *q = ucmd->cmd;

	if (q->flags)
		return -EINVAL;
	q->api_version = KVMLU_API_VERSION;
	q->max_vcpus = KVMLU_MAX_VCPUS;
	q->capabilities = KVMLU_CAP_TABLES | KVMLU_CAP_BINDINGS |
			  KVMLU_CAP_SESSIONS;
	kvmlu_tables_totals(&q->nr_tables, &q->nr_bindings, &q->stats);
	q->nr_sessions = kvmlu_session_count();
	q->reserved = 0;
	return kvmlu_ucmd_respond(ucmd, sizeof(*q));
}

static int kvmlu_create_table(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_create_table *ct = ucmd->cmd;
	struct file *file;
	int fd, ret;

	if (ct->flags)
		return -EINVAL;
	if (ct->nr_vcpus < 1 || ct->nr_vcpus > KVMLU_MAX_VCPUS)
		return -ERANGE;

	fd = get_unused_fd_flags(O_CLOEXEC);
	if (fd < 0)
		return fd;
	ret = kvmlu_table_create(ct->nr_vcpus, &file);
	if (ret) {
		put_unused_fd(fd);
		return ret;
	}
	ct->fd = fd;
	return kvmlu_ucmd_reply_fd(ucmd, sizeof(*ct), fd, file);
}

static const struct kvmlu_ioctl_op kvmlu_dev_ops[] = {
	KVMLU_IOCTL_OP(KVMLU_CMD_BASE, KVMLU_QUERY, kvmlu_query,
		       struct kvmlu_query, stats),
	KVMLU_IOCTL_OP(KVMLU_CMD_BASE, KVMLU_CREATE_TABLE, kvmlu_create_table,
		       struct kvmlu_create_table, fd),
	KVMLU_IOCTL_OP(KVMLU_CMD_BASE, KVMLU_CREATE_SESSION,
		       kvmlu_create_session, struct kvmlu_session_create,
		       reserved),
	KVMLU_IOCTL_OP(KVMLU_CMD_BASE, KVMLU_RETRIEVE_SESSION,
		       kvmlu_retrieve_session, struct kvmlu_session_create,
		       reserved),
	KVMLU_IOCTL_OP(KVMLU_CMD_BASE, KVMLU_LIST_SESSIONS, kvmlu_list_sessions,
		       struct kvmlu_list_sessions, entries),
};

static long kvmlu_dev_ioctl(struct file *file, unsigned int cmd,
			    unsigned long arg)
{
	return kvmlu_ioctl_dispatch(kvmlu_dev_ops, ARRAY_SIZE(kvmlu_dev_ops),
				    KVMLU_CMD_BASE, cmd, arg, NULL);
}

static const struct file_operations kvmlu_dev_fops = {
	.owner = THIS_MODULE,
	.open = nonseekable_open,
	.unlocked_ioctl = kvmlu_dev_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice kvmlu_miscdev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "kvmlu",
	.fops = &kvmlu_dev_fops,
	.mode = 0600,
};

static int __init kvmlu_init(void)
{
	int ret;

	ret = misc_register(&kvmlu_miscdev);
	if (ret) {
		pr_err("cannot register /dev/kvmlu: %d\n", ret);
		return ret;
	}
	pr_info("API version %d, up to %d vCPUs a table\n",
		KVMLU_API_VERSION, KVMLU_MAX_VCPUS);
	return 0;
}

static void __exit kvmlu_exit(void)
{
	misc_deregister(&kvmlu_miscdev);
	/* Replaced notification targets still waiting for their put. */
	rcu_barrier();
}

module_init(kvmlu_init);
module_exit(kvmlu_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kvmlu: posted-interrupt descriptors that survive a VMM upgrade");
