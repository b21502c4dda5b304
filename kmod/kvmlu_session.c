// SPDX-License-Identifier: GPL-2.0
/*
 * kvmlu: sessions, which keep files for a successor process.
 *
 * A session is on the module's list from CREATE until FINISH, whether or not a
 * file descriptor of it is open; each session file holds a reference on the
 * session, and the list holds one more. While on the list a session also
 * holds a reference on this module. Preserved files are kept with a file
 * reference each, so what they stand for -- a binding, a table, a VFIO device
 * with its MSI triggers -- lives on with no process holding it.
 *
 * A session belongs to its creator: the effective uid and user namespace of
 * the task that issued CREATE_SESSION. Names are unique per owner. Only the
 * owner, or a task with CAP_SYS_ADMIN in the owner's user namespace (which
 * includes its ancestors' administrators and the namespace's creator), can
 * retrieve a session or see it listed; to anyone else it does not exist.
 * Identity is the calling task's at each ioctl, not that of the opener of
 * /dev/kvmlu: a device fd handed to a VMM lends it no one else's sessions.
 * An open session fd, by contrast, is a capability like any other file.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/anon_inodes.h>
#include <linux/capability.h>
#include <linux/cred.h>
#include <linux/eventfd.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/module.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <linux/uidgid.h>
#include <linux/user_namespace.h>

#include "kvmlu_internal.h"

/**
 * struct kvmlu_object - one preserved file
 * @token: The token it is retrieved by.
 * @file: The file; the session holds a reference.
 * @link: Entry in &kvmlu_session.objects.
 */
struct kvmlu_object {
	u64 token;
	struct file *file;
	struct list_head link;
};

/**
 * struct kvmlu_session - a named set of preserved files
 * @ref: References: the module's list and each session file.
 * @name: The name, NUL-terminated, unique among @owner_ns/@owner_uid's
 *	sessions. Fixed.
 * @owner_uid: The creator's effective uid. Fixed.
 * @owner_ns: The creator's user namespace; the session holds a reference,
 *	so the namespace outlives every task in it while the session exists.
 *	Fixed.
 * @node: Entry in kvmlu_sessions, under kvmlu_sessions_lock, until finish.
 * @held: Session files open. Under kvmlu_sessions_lock.
 * @lock: Protects @objects, @nr_objects and @finished.
 * @objects: The preserved files, &struct kvmlu_object.
 * @nr_objects: Entries in @objects.
 * @finished: FINISH ran: @objects is empty for good.
 */
struct kvmlu_session {
	struct kref ref;
	char name[KVMLU_SESSION_NAME_LEN];
	kuid_t owner_uid;
	struct user_namespace *owner_ns;
	struct list_head node;
	unsigned int held;
	struct mutex lock; /* see above */
	struct list_head objects;
	u32 nr_objects;
	bool finished;
};

/* Protects kvmlu_sessions, kvmlu_nr_sessions and each &kvmlu_session.held. */
static DEFINE_MUTEX(kvmlu_sessions_lock);
static LIST_HEAD(kvmlu_sessions);
/* Entries of kvmlu_sessions. */
static u32 kvmlu_nr_sessions;

static const struct file_operations kvmlu_session_fops;

static void kvmlu_session_free(struct kref *ref)
{
	struct kvmlu_session *s = container_of(ref, struct kvmlu_session, ref);

	WARN_ON(!list_empty(&s->objects));
	put_user_ns(s->owner_ns);
	mutex_destroy(&s->lock);
	kfree(s);
}

static void kvmlu_session_put(struct kvmlu_session *s)
{
	kref_put(&s->ref, kvmlu_session_free);
}

/* Copy and check a name: 1..63 bytes, NUL, zeros. */
static int kvmlu_session_name(char *dst, const __u8 *src)
{
	size_t len = strnlen((const char *)src, KVMLU_SESSION_NAME_LEN);
	size_t i;

	if (len == 0 || len == KVMLU_SESSION_NAME_LEN)
		return -EINVAL;
	for (i = len; i < KVMLU_SESSION_NAME_LEN; i++)
		if (src[i])
			return -EINVAL;
	memcpy(dst, src, KVMLU_SESSION_NAME_LEN);
	return 0;
}

/* Is the calling task @s's owner: the same effective uid, in the same userns? */
static bool kvmlu_session_owned(const struct kvmlu_session *s)
{
	return uid_eq(s->owner_uid, current_euid()) &&
	       s->owner_ns == current_user_ns();
}

/*
 * May the calling task retrieve @s: is it the owner, or capable of
 * CAP_SYS_ADMIN over the owner's namespace? Without an audit record, for
 * looking; kvmlu_session_resolve() uses the capability in earnest.
 */
static bool kvmlu_session_visible(const struct kvmlu_session *s)
{
	return kvmlu_session_owned(s) ||
	       ns_capable_noaudit(s->owner_ns, CAP_SYS_ADMIN);
}

/* The calling task's own session called @name, or NULL. */
static struct kvmlu_session *kvmlu_session_find_own(const char *name)
{
	struct kvmlu_session *s;

	lockdep_assert_held(&kvmlu_sessions_lock);
	list_for_each_entry(s, &kvmlu_sessions, node)
		if (!strcmp(s->name, name) && kvmlu_session_owned(s))
			return s;
	return NULL;
}

/*
 * The session @name means to the calling task: its own if it has one; else
 * the one session of that name it may take over with CAP_SYS_ADMIN.
 * -ENOENT if there is none it may retrieve, -ENOTUNIQ if the sessions of
 * several other owners qualify (the name does not say which).
 */
static struct kvmlu_session *kvmlu_session_resolve(const char *name)
{
	struct kvmlu_session *s, *found = NULL;
	bool several = false;

	lockdep_assert_held(&kvmlu_sessions_lock);
	s = kvmlu_session_find_own(name);
	if (s)
		return s;
	list_for_each_entry(s, &kvmlu_sessions, node) {
		if (strcmp(s->name, name) ||
		    !ns_capable_noaudit(s->owner_ns, CAP_SYS_ADMIN))
			continue;
		if (found) {
			several = true;
			break;
		}
		found = s;
	}
	if (several)
		return ERR_PTR(-ENOTUNIQ);
	/* Now use the capability: audit it and mark the task as privileged. */
	if (!found || !ns_capable(found->owner_ns, CAP_SYS_ADMIN))
		return ERR_PTR(-ENOENT);
	return found;
}

/* Drop every object; the session is finished. Caller holds @s->lock. */
static void kvmlu_session_drop_objects(struct kvmlu_session *s)
{
	struct kvmlu_object *obj, *tmp;

	lockdep_assert_held(&s->lock);
	list_for_each_entry_safe(obj, tmp, &s->objects, link) {
		list_del(&obj->link);
		fput(obj->file);
		kfree(obj);
	}
	s->nr_objects = 0;
}

/*
 * A new file for @s, with its own session reference. Counts as held;
 * the caller holds kvmlu_sessions_lock.
 */
static struct file *kvmlu_session_file(struct kvmlu_session *s)
{
	struct file *file;

	lockdep_assert_held(&kvmlu_sessions_lock);
	file = anon_inode_getfile("[kvmlu-session]", &kvmlu_session_fops, s,
				  O_RDWR);
	if (IS_ERR(file))
		return file;
	kref_get(&s->ref);
	s->held++;
	return file;
}

/*
 * Open a new fd on @s and put it in the user's reply; on failure nothing is
 * left behind but @s itself. Caller holds kvmlu_sessions_lock, so FINISH
 * cannot run on @s before the caller is done with it.
 */
static int kvmlu_session_reply(struct kvmlu_ucmd *ucmd,
			       struct kvmlu_session_create *sc,
			       struct kvmlu_session *s)
{
	struct file *file;
	int fd;

	lockdep_assert_held(&kvmlu_sessions_lock);
	fd = get_unused_fd_flags(O_CLOEXEC);
	if (fd < 0)
		return fd;
	file = kvmlu_session_file(s);
	if (IS_ERR(file)) {
		put_unused_fd(fd);
		return PTR_ERR(file);
	}
	sc->fd = fd;
	/* On failure the file's release drops its reference and hold on @s. */
	return kvmlu_ucmd_reply_fd(ucmd, sizeof(*sc), fd, file);
}

int kvmlu_create_session(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_session_create *sc = ucmd->cmd;
	struct kvmlu_session *s;
	int ret;

	if (sc->flags || sc->reserved)
		return -EINVAL;
	s = kzalloc(sizeof(*s), GFP_KERNEL_ACCOUNT);
	if (!s)
		return -ENOMEM;
	ret = kvmlu_session_name(s->name, sc->name);
	if (ret) {
		kfree(s);
		return ret;
	}
	s->owner_uid = current_euid();
	s->owner_ns = get_user_ns(current_user_ns());
	/* The initial reference is the module list's. */
	kref_init(&s->ref);
	mutex_init(&s->lock);
	INIT_LIST_HEAD(&s->objects);
	INIT_LIST_HEAD(&s->node);

	mutex_lock(&kvmlu_sessions_lock);
	if (kvmlu_session_find_own(s->name))
		ret = -EEXIST;
	else
		ret = kvmlu_session_reply(ucmd, sc, s);
	if (!ret) {
		list_add_tail(&s->node, &kvmlu_sessions);
		kvmlu_nr_sessions++;
		__module_get(THIS_MODULE);
	}
	mutex_unlock(&kvmlu_sessions_lock);
	if (ret)
		kvmlu_session_put(s);
	return ret;
}

int kvmlu_retrieve_session(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_session_create *sc = ucmd->cmd;
	char name[KVMLU_SESSION_NAME_LEN];
	struct kvmlu_session *s;
	int ret;

	if (sc->flags || sc->reserved)
		return -EINVAL;
	ret = kvmlu_session_name(name, sc->name);
	if (ret)
		return ret;

	mutex_lock(&kvmlu_sessions_lock);
	s = kvmlu_session_resolve(name);
	if (IS_ERR(s))
		ret = PTR_ERR(s);
	else if (s->held)
		ret = -EBUSY;
	else
		ret = kvmlu_session_reply(ucmd, sc, s);
	mutex_unlock(&kvmlu_sessions_lock);
	return ret;
}

int kvmlu_list_sessions(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_list_sessions *ls = ucmd->cmd;
	struct kvmlu_session_entry *entries = NULL;
	struct kvmlu_session *s;
	u32 n, want, room = 0, i = 0;
	int ret = 0;

	if (ls->flags)
		return -EINVAL;

	/*
	 * Snapshot the entries under the lock and copy them out after it, so
	 * that an entries buffer that faults or stalls (userfaultfd, a slow
	 * file) holds up no other caller. Sessions may come and go between
	 * sizing and filling: size again until the room suffices. Only the
	 * sessions the caller may retrieve are counted and listed.
	 */
	for (;;) {
		mutex_lock(&kvmlu_sessions_lock);
		n = 0;
		list_for_each_entry(s, &kvmlu_sessions, node)
			n += kvmlu_session_visible(s);
		want = min(n, ls->count);
		if (want <= room)
			break;
		mutex_unlock(&kvmlu_sessions_lock);
		kvfree(entries);
		room = want;
		entries = kvcalloc(room, sizeof(*entries), GFP_KERNEL_ACCOUNT);
		if (!entries)
			return -ENOMEM;
	}
	list_for_each_entry(s, &kvmlu_sessions, node) {
		struct kvmlu_session_entry *e;

		if (i == want)
			break;
		if (!kvmlu_session_visible(s))
			continue;
		e = &entries[i++];
		memcpy(e->name, s->name, sizeof(e->name));
		mutex_lock(&s->lock);
		e->nr_objects = s->nr_objects;
		mutex_unlock(&s->lock);
		e->state = s->held ? KVMLU_SESSION_HELD : 0;
	}
	mutex_unlock(&kvmlu_sessions_lock);

	if (want && copy_to_user(u64_to_user_ptr(ls->entries), entries,
				 array_size(want, sizeof(*entries))))
		ret = -EFAULT;
	kvfree(entries);
	if (ret)
		return ret;
	ls->nr_sessions = n;
	return kvmlu_ucmd_respond(ucmd, sizeof(*ls));
}

u32 kvmlu_session_count(void)
{
	u32 n;

	mutex_lock(&kvmlu_sessions_lock);
	n = kvmlu_nr_sessions;
	mutex_unlock(&kvmlu_sessions_lock);
	return n;
}

/*
 * Can @file be preserved? Files that may hold references to other files
 * (sessions, sockets, epoll, io_uring...) could keep their own session alive;
 * anonymous-inode files other than those listed have unknown state.
 */
static bool kvmlu_preservable(struct file *file)
{
	umode_t mode = file_inode(file)->i_mode;
	struct eventfd_ctx *ctx;

	if (file->f_op == &kvmlu_session_fops)
		return false;
	if (S_ISREG(mode) || S_ISCHR(mode) || S_ISFIFO(mode))
		return true;
	if (kvmlu_is_table_file(file) || kvmlu_is_binding_file(file))
		return true;
	ctx = eventfd_ctx_fileget(file);
	if (!IS_ERR(ctx)) {
		eventfd_ctx_put(ctx);
		return true;
	}
	/* vfio-pci's device fd, an anonymous inode named by VFIO. */
	return !strcmp(file_dentry(file)->d_name.name, "[vfio-device]");
}

static struct kvmlu_object *kvmlu_session_lookup(struct kvmlu_session *s,
						 u64 token)
{
	struct kvmlu_object *obj;

	lockdep_assert_held(&s->lock);
	list_for_each_entry(obj, &s->objects, link)
		if (obj->token == token)
			return obj;
	return NULL;
}

static int kvmlu_session_preserve(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_session_preserve *sp = ucmd->cmd;
	struct kvmlu_session *s = ucmd->obj;
	struct kvmlu_object *obj;
	struct file *file;
	int ret;

	if (sp->flags || sp->reserved)
		return -EINVAL;
	file = fget(sp->fd);
	if (!file)
		return -EBADF;
	if (!kvmlu_preservable(file)) {
		ret = -EOPNOTSUPP;
		goto err_fput;
	}
	obj = kzalloc(sizeof(*obj), GFP_KERNEL_ACCOUNT);
	if (!obj) {
		ret = -ENOMEM;
		goto err_fput;
	}
	obj->token = sp->token;
	obj->file = file;

	mutex_lock(&s->lock);
	if (s->finished)
		ret = -ESTALE;
	else if (kvmlu_session_lookup(s, sp->token))
		ret = -EEXIST;
	else
		ret = 0;
	if (!ret) {
		list_add_tail(&obj->link, &s->objects);
		s->nr_objects++;
	}
	mutex_unlock(&s->lock);
	if (!ret)
		return 0;
	kfree(obj);
err_fput:
	fput(file);
	return ret;
}

static int kvmlu_session_retrieve(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_session_token *st = ucmd->cmd;
	struct kvmlu_session *s = ucmd->obj;
	struct kvmlu_object *obj;
	struct file *file = NULL;
	int fd, ret = 0;

	if (st->flags || st->reserved)
		return -EINVAL;
	fd = get_unused_fd_flags(O_CLOEXEC);
	if (fd < 0)
		return fd;

	mutex_lock(&s->lock);
	obj = s->finished ? NULL : kvmlu_session_lookup(s, st->token);
	if (obj)
		file = get_file(obj->file);
	else
		ret = s->finished ? -ESTALE : -ENOENT;
	mutex_unlock(&s->lock);
	if (ret) {
		put_unused_fd(fd);
		return ret;
	}
	st->fd = fd;
	return kvmlu_ucmd_reply_fd(ucmd, sizeof(*st), fd, file);
}

static int kvmlu_session_unpreserve(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_session_token *st = ucmd->cmd;
	struct kvmlu_session *s = ucmd->obj;
	struct kvmlu_object *obj;
	int ret = 0;

	if (st->flags || st->reserved || st->fd)
		return -EINVAL;

	mutex_lock(&s->lock);
	obj = s->finished ? NULL : kvmlu_session_lookup(s, st->token);
	if (obj) {
		list_del(&obj->link);
		s->nr_objects--;
	} else {
		ret = s->finished ? -ESTALE : -ENOENT;
	}
	mutex_unlock(&s->lock);
	if (obj) {
		fput(obj->file);
		kfree(obj);
	}
	return ret;
}

static int kvmlu_session_finish(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_session_finish *sf = ucmd->cmd;
	struct kvmlu_session *s = ucmd->obj;
	bool was_finished;

	if (sf->flags)
		return -EINVAL;

	mutex_lock(&kvmlu_sessions_lock);
	mutex_lock(&s->lock);
	was_finished = s->finished;
	if (!was_finished) {
		kvmlu_session_drop_objects(s);
		s->finished = true;
		list_del_init(&s->node);
		kvmlu_nr_sessions--;
	}
	mutex_unlock(&s->lock);
	mutex_unlock(&kvmlu_sessions_lock);

	if (!was_finished) {
		/* The list's references: on the session and on the module. */
		kvmlu_session_put(s);
		module_put(THIS_MODULE);
	}
	return 0;
}

static int kvmlu_session_release(struct inode *inode, struct file *file)
{
	struct kvmlu_session *s = file->private_data;

	mutex_lock(&kvmlu_sessions_lock);
	s->held--;
	mutex_unlock(&kvmlu_sessions_lock);
	kvmlu_session_put(s);
	return 0;
}

static const struct kvmlu_ioctl_op kvmlu_session_ops[] = {
	KVMLU_IOCTL_OP_IN(KVMLU_SESSION_CMD_BASE, KVMLU_SESSION_PRESERVE,
			  kvmlu_session_preserve,
			  struct kvmlu_session_preserve, token),
	KVMLU_IOCTL_OP(KVMLU_SESSION_CMD_BASE, KVMLU_SESSION_RETRIEVE,
		       kvmlu_session_retrieve, struct kvmlu_session_token,
		       reserved),
	KVMLU_IOCTL_OP_IN(KVMLU_SESSION_CMD_BASE, KVMLU_SESSION_UNPRESERVE,
			  kvmlu_session_unpreserve, struct kvmlu_session_token,
			  reserved),
	KVMLU_IOCTL_OP_IN(KVMLU_SESSION_CMD_BASE, KVMLU_SESSION_FINISH,
			  kvmlu_session_finish, struct kvmlu_session_finish,
			  flags),
};

static long kvmlu_session_ioctl(struct file *file, unsigned int cmd,
				unsigned long arg)
{
	return kvmlu_ioctl_dispatch(kvmlu_session_ops,
				    ARRAY_SIZE(kvmlu_session_ops),
				    KVMLU_SESSION_CMD_BASE, cmd, arg,
				    file->private_data);
}

static const struct file_operations kvmlu_session_fops = {
	.owner = THIS_MODULE,
	.release = kvmlu_session_release,
	.unlocked_ioctl = kvmlu_session_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};
