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
 *
 * Sessions are found by name in a hash table, objects by token in a
 * per-session rbtree, and a file already preserved (in any session) in a
 * hash table keyed by the file: no command walks every session or every
 * object but LIST_SESSIONS and FINISH. Files are put only after the locks
 * are dropped, since the last fput() of a VFIO device or a binding does
 * real work.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/anon_inodes.h>
#include <linux/capability.h>
#include <linux/cred.h>
#include <linux/eventfd.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/hash.h>
#include <linux/hashtable.h>
#include <linux/magic.h>
#include <linux/major.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/rbtree.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/stringhash.h>
#include <linux/uaccess.h>
#include <linux/uidgid.h>
#include <linux/user_namespace.h>
#include <linux/vfio.h>

#include "kvmlu_internal.h"

/*
 * The limits, kvmlu.ko parameters an administrator may change at any time;
 * a change applies to the sessions and objects created after it.
 */
static unsigned int max_sessions_per_owner = 1024;
module_param(max_sessions_per_owner, uint, 0644);
MODULE_PARM_DESC(max_sessions_per_owner,
		 "Sessions one owner may have until they are finished (EDQUOT beyond)");
static unsigned int max_objects_per_session = 65536;
module_param(max_objects_per_session, uint, 0644);
MODULE_PARM_DESC(max_objects_per_session,
		 "Files one session may preserve (ENOSPC beyond)");

/**
 * struct kvmlu_object - one preserved file
 * @token: The token it is retrieved by.
 * @file: The file; the session holds a reference.
 * @node: Entry in &kvmlu_session.objects, by @token.
 * @file_node: Entry in kvmlu_preserved_files, by @file.
 */
struct kvmlu_object {
	u64 token;
	struct file *file;
	struct rb_node node;
	struct hlist_node file_node;
};

/**
 * struct kvmlu_owner - the sessions of one owner, counted
 * @uid: The owner's effective uid.
 * @ns: The owner's user namespace. Not a reference: each of the owner's
 *	sessions holds one, and the record lives only while there is one.
 * @nr_sessions: The owner's sessions on the list.
 * @node: Entry in kvmlu_owners.
 */
struct kvmlu_owner {
	kuid_t uid;
	struct user_namespace *ns;
	unsigned int nr_sessions;
	struct hlist_node node;
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
 * @owner: The owner's count; set while on the list.
 * @node: Entry in kvmlu_sessions, under kvmlu_sessions_lock, until finish.
 * @name_node: Entry in kvmlu_session_names, likewise.
 * @held: Session files open. Under kvmlu_sessions_lock.
 * @lock: Protects @objects, @nr_objects and @finished.
 * @objects: The preserved files, &struct kvmlu_object, by token.
 * @nr_objects: Entries in @objects. Written under @lock, read without.
 * @finished: FINISH ran: @objects is empty for good.
 */
struct kvmlu_session {
	struct kref ref;
	char name[KVMLU_SESSION_NAME_LEN];
	kuid_t owner_uid;
	struct user_namespace *owner_ns;
	struct kvmlu_owner *owner;
	struct list_head node;
	struct hlist_node name_node;
	unsigned int held;
	struct mutex lock; /* see above */
	struct rb_root objects;
	u32 nr_objects;
	bool finished;
};

/*
 * Protects kvmlu_sessions, kvmlu_session_names, kvmlu_owners,
 * kvmlu_nr_sessions (written under it, read without) and each
 * &kvmlu_session.held. Taken before any &kvmlu_session.lock.
 */
static DEFINE_MUTEX(kvmlu_sessions_lock);
/* The sessions, oldest first, for LIST_SESSIONS. */
static LIST_HEAD(kvmlu_sessions);
/* The same sessions by the hash of their name. */
static DEFINE_HASHTABLE(kvmlu_session_names, 10);
/* A &struct kvmlu_owner for each owner with a session on the list. */
static DEFINE_HASHTABLE(kvmlu_owners, 6);
/* Entries of kvmlu_sessions. */
static u32 kvmlu_nr_sessions;

/*
 * Every preserved file, by its address, so that one file is not preserved
 * twice. Nests inside &kvmlu_session.lock.
 */
static DEFINE_SPINLOCK(kvmlu_preserved_lock);
static DEFINE_HASHTABLE(kvmlu_preserved_files, 10);

static const struct file_operations kvmlu_session_fops;

static void kvmlu_session_free(struct kref *ref)
{
	struct kvmlu_session *s = container_of(ref, struct kvmlu_session, ref);

	WARN_ON(!RB_EMPTY_ROOT(&s->objects));
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

static u32 kvmlu_name_hash(const char *name)
{
	return full_name_hash(NULL, name, strlen(name));
}

/* The calling task's own session called @name, or NULL. */
static struct kvmlu_session *kvmlu_session_find_own(const char *name)
{
	struct kvmlu_session *s;

	lockdep_assert_held(&kvmlu_sessions_lock);
	hash_for_each_possible(kvmlu_session_names, s, name_node,
			       kvmlu_name_hash(name))
		if (!strcmp(s->name, name) && kvmlu_session_owned(s))
			return s;
	return NULL;
}

static u32 kvmlu_owner_hash(const struct user_namespace *ns, kuid_t uid)
{
	return hash_ptr(ns, 32) ^ __kuid_val(uid);
}

/* The calling task's owner record, or NULL if it has no session. */
static struct kvmlu_owner *kvmlu_owner_find(void)
{
	struct user_namespace *ns = current_user_ns();
	kuid_t uid = current_euid();
	struct kvmlu_owner *o;

	lockdep_assert_held(&kvmlu_sessions_lock);
	hash_for_each_possible(kvmlu_owners, o, node, kvmlu_owner_hash(ns, uid))
		if (o->ns == ns && uid_eq(o->uid, uid))
			return o;
	return NULL;
}

/*
 * Count one more session for the calling task, or -EDQUOT at the limit.
 * @spare is a zeroed record to use if the task has none yet; it is set to
 * NULL when used.
 */
static struct kvmlu_owner *kvmlu_owner_get(struct kvmlu_owner **spare)
{
	struct kvmlu_owner *o;

	lockdep_assert_held(&kvmlu_sessions_lock);
	o = kvmlu_owner_find();
	if (o) {
		if (o->nr_sessions >= READ_ONCE(max_sessions_per_owner))
			return ERR_PTR(-EDQUOT);
	} else {
		if (!READ_ONCE(max_sessions_per_owner))
			return ERR_PTR(-EDQUOT);
		o = *spare;
		*spare = NULL;
		o->uid = current_euid();
		o->ns = current_user_ns();
		hash_add(kvmlu_owners, &o->node, kvmlu_owner_hash(o->ns, o->uid));
	}
	o->nr_sessions++;
	return o;
}

static void kvmlu_owner_put(struct kvmlu_owner *o)
{
	lockdep_assert_held(&kvmlu_sessions_lock);
	if (--o->nr_sessions)
		return;
	hash_del(&o->node);
	kfree(o);
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
	hash_for_each_possible(kvmlu_session_names, s, name_node,
			       kvmlu_name_hash(name)) {
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

/*
 * Take every object out of @s and return them as a tree for
 * kvmlu_objects_free(), to be called once the locks are dropped.
 */
static struct rb_root kvmlu_session_take_objects(struct kvmlu_session *s)
{
	struct rb_root taken = s->objects;
	struct kvmlu_object *obj, *tmp;

	lockdep_assert_held(&s->lock);
	spin_lock(&kvmlu_preserved_lock);
	rbtree_postorder_for_each_entry_safe(obj, tmp, &taken, node)
		hash_del(&obj->file_node);
	spin_unlock(&kvmlu_preserved_lock);
	s->objects = RB_ROOT;
	WRITE_ONCE(s->nr_objects, 0);
	return taken;
}

/* Put the files of objects taken out of their session, and free them. */
static void kvmlu_objects_free(struct rb_root *taken)
{
	struct kvmlu_object *obj, *tmp;

	rbtree_postorder_for_each_entry_safe(obj, tmp, taken, node) {
		fput(obj->file);
		kfree(obj);
	}
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
	struct kvmlu_owner *spare, *owner = NULL;
	struct kvmlu_session *s;
	int ret;

	if (sc->flags || sc->reserved)
		return -EINVAL;
	s = kzalloc(sizeof(*s), GFP_KERNEL_ACCOUNT);
	spare = kzalloc(sizeof(*spare), GFP_KERNEL_ACCOUNT);
	if (!s || !spare) {
		kfree(spare);
		kfree(s);
		return -ENOMEM;
	}
	ret = kvmlu_session_name(s->name, sc->name);
	if (ret) {
		kfree(spare);
		kfree(s);
		return ret;
	}
	s->owner_uid = current_euid();
	s->owner_ns = get_user_ns(current_user_ns());
	/* The initial reference is the module list's. */
	kref_init(&s->ref);
	mutex_init(&s->lock);
	s->objects = RB_ROOT;
	INIT_LIST_HEAD(&s->node);

	mutex_lock(&kvmlu_sessions_lock);
	if (kvmlu_session_find_own(s->name)) {
		ret = -EEXIST;
	} else {
		owner = kvmlu_owner_get(&spare);
		if (IS_ERR(owner))
			ret = PTR_ERR(owner);
		else
			ret = kvmlu_session_reply(ucmd, sc, s);
	}
	if (!ret) {
		s->owner = owner;
		list_add_tail(&s->node, &kvmlu_sessions);
		hash_add(kvmlu_session_names, &s->name_node,
			 kvmlu_name_hash(s->name));
		WRITE_ONCE(kvmlu_nr_sessions, kvmlu_nr_sessions + 1);
		__module_get(THIS_MODULE);
	} else if (!IS_ERR_OR_NULL(owner)) {
		kvmlu_owner_put(owner);
	}
	mutex_unlock(&kvmlu_sessions_lock);
	kfree(spare);
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
		e->nr_objects = READ_ONCE(s->nr_objects);
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
	return READ_ONCE(kvmlu_nr_sessions);
}

/* Is @file one of VFIO's: its container, a group or a device? */
static bool kvmlu_vfio_file(struct file *file)
{
	struct inode *inode = file_inode(file);
	bool (*is_vfio)(struct file *file);
	bool ret = false;

	/* /dev/vfio/vfio, whether VFIO or iommufd provides it. */
	if (S_ISCHR(inode->i_mode) && imajor(inode) == MISC_MAJOR &&
	    iminor(inode) == VFIO_MINOR)
		return true;
	/*
	 * Found at run time, so that kvmlu.ko loads without vfio.ko; if VFIO
	 * is not loaded, no file is VFIO's.
	 */
#ifdef KVMLU_HAVE_VFIO_FILE_IS_VALID
	is_vfio = symbol_get(vfio_file_is_valid);
	if (is_vfio) {
		ret = is_vfio(file);
		symbol_put(vfio_file_is_valid);
	}
#else
	is_vfio = symbol_get(vfio_file_is_group);
	if (is_vfio) {
		ret = is_vfio(file);
		symbol_put(vfio_file_is_group);
	}
	/*
	 * Kernels without vfio_file_is_valid() export no test for a device
	 * fd: it is VFIO's anonymous file of that name.
	 */
	if (!ret && file->f_op->owner &&
	    !strcmp(module_name(file->f_op->owner), "vfio"))
		ret = !strcmp(file_dentry(file)->d_name.name, "[vfio-device]");
#endif
	return ret;
}

/*
 * Can @file be preserved? Only what is on this list, whatever else a kernel
 * lets a file do: no file here can hold a reference to another file (a
 * socket with fds in flight, epoll, io_uring, a session could keep their
 * own session alive), and each keeps its state with no process holding it.
 */
static bool kvmlu_preservable(struct file *file)
{
	struct inode *inode = file_inode(file);
	struct eventfd_ctx *ctx;

	if (kvmlu_is_table_file(file) || kvmlu_is_binding_file(file))
		return true;
	/* Pipes and FIFOs. */
	if (S_ISFIFO(inode->i_mode))
		return true;
	/* memfds and other files of tmpfs or hugetlbfs: guest RAM, state. */
	if (S_ISREG(inode->i_mode))
		return inode->i_sb->s_magic == TMPFS_MAGIC ||
		       inode->i_sb->s_magic == HUGETLBFS_MAGIC;
	ctx = eventfd_ctx_fileget(file);
	if (!IS_ERR(ctx)) {
		eventfd_ctx_put(ctx);
		return true;
	}
	return kvmlu_vfio_file(file);
}

static struct kvmlu_object *kvmlu_session_lookup(struct kvmlu_session *s,
						 u64 token)
{
	struct rb_node *n = s->objects.rb_node;

	lockdep_assert_held(&s->lock);
	while (n) {
		struct kvmlu_object *obj = rb_entry(n, struct kvmlu_object, node);

		if (token < obj->token)
			n = n->rb_left;
		else if (token > obj->token)
			n = n->rb_right;
		else
			return obj;
	}
	return NULL;
}

/* Is @file preserved, in any session? */
static bool kvmlu_file_preserved(struct file *file)
{
	struct kvmlu_object *obj;

	lockdep_assert_held(&kvmlu_preserved_lock);
	hash_for_each_possible(kvmlu_preserved_files, obj, file_node,
			       hash_ptr(file, 32))
		if (obj->file == file)
			return true;
	return false;
}

/*
 * Add @new to @s: -EEXIST if its token is taken, -EALREADY if its file is
 * preserved already (here or in another session), -ENOSPC at the limit.
 */
static int kvmlu_session_insert(struct kvmlu_session *s,
				struct kvmlu_object *new)
{
	struct rb_node **link = &s->objects.rb_node, *parent = NULL;
	int ret = 0;

	lockdep_assert_held(&s->lock);
	while (*link) {
		struct kvmlu_object *obj;

		parent = *link;
		obj = rb_entry(parent, struct kvmlu_object, node);
		if (new->token < obj->token)
			link = &parent->rb_left;
		else if (new->token > obj->token)
			link = &parent->rb_right;
		else
			return -EEXIST;
	}
	if (s->nr_objects >= READ_ONCE(max_objects_per_session))
		return -ENOSPC;
	spin_lock(&kvmlu_preserved_lock);
	if (kvmlu_file_preserved(new->file))
		ret = -EALREADY;
	else
		hash_add(kvmlu_preserved_files, &new->file_node,
			 hash_ptr(new->file, 32));
	spin_unlock(&kvmlu_preserved_lock);
	if (ret)
		return ret;
	rb_link_node(&new->node, parent, link);
	rb_insert_color(&new->node, &s->objects);
	WRITE_ONCE(s->nr_objects, s->nr_objects + 1);
	return 0;
}

/* Take @obj out of @s. */
static void kvmlu_session_remove(struct kvmlu_session *s,
				 struct kvmlu_object *obj)
{
	lockdep_assert_held(&s->lock);
	spin_lock(&kvmlu_preserved_lock);
	hash_del(&obj->file_node);
	spin_unlock(&kvmlu_preserved_lock);
	rb_erase(&obj->node, &s->objects);
	WRITE_ONCE(s->nr_objects, s->nr_objects - 1);
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
	else
		ret = kvmlu_session_insert(s, obj);
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
	if (obj)
		kvmlu_session_remove(s, obj);
	else
		ret = s->finished ? -ESTALE : -ENOENT;
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
	struct rb_root taken = RB_ROOT;
	bool was_finished;

	if (sf->flags)
		return -EINVAL;

	mutex_lock(&kvmlu_sessions_lock);
	mutex_lock(&s->lock);
	was_finished = s->finished;
	if (!was_finished) {
		taken = kvmlu_session_take_objects(s);
		s->finished = true;
		list_del_init(&s->node);
		hash_del(&s->name_node);
		kvmlu_owner_put(s->owner);
		s->owner = NULL;
		WRITE_ONCE(kvmlu_nr_sessions, kvmlu_nr_sessions - 1);
	}
	mutex_unlock(&s->lock);
	mutex_unlock(&kvmlu_sessions_lock);

	kvmlu_objects_free(&taken);
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
