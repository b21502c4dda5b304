// SPDX-License-Identifier: GPL-2.0
/*
 * kvmlu: the versioned vAPIC, built once per format version.
 *
 * kvmlu_vapic_v1.c and kvmlu_vapic_v2.c define KVMLU_VAPIC_VERSION and
 * include this file, so both modules come from one source and differ only
 * where the version says. They play the part kvm-intel plays in a split-KVM
 * upgrade: swappable under running VMs, while kvmlu.ko keeps the descriptors.
 *
 * A vAPIC object holds a reference on its table (through kvmlu.ko's exported
 * interface) and the per-vCPU interrupt state, all of it under one mutex:
 * every operation comes from an ioctl, in process context.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/anon_inodes.h>
#include <linux/bitops.h>
#include <linux/crc32.h>
#include <linux/file.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/stringify.h>
#include <linux/uaccess.h>

#include "kvmlu_internal.h"

#ifndef KVMLU_VAPIC_VERSION
#error "build kvmlu_vapic_v1.c or kvmlu_vapic_v2.c, not this file"
#endif

#define KVMLU_VAPIC_NAME "kvmlu_vapic_v" __stringify(KVMLU_VAPIC_VERSION)

/*
 * The structure the per-vCPU commands copy in, and its last field as first
 * released. kmod/test/kvmlu_vapic_grown.c grows it, as a later version that
 * adds fields would.
 */
#ifndef KVMLU_VAPIC_VCPU_ARG
#define KVMLU_VAPIC_VCPU_ARG	struct kvmlu_vapic_vcpu
#define KVMLU_VAPIC_VCPU_LAST	moved
#endif

/* Bytes of one vCPU record in each format version. */
#define KVMLU_VAPIC_V1_RECORD	(2 * 4 * sizeof(u64))
#define KVMLU_VAPIC_V2_RECORD	(3 * 4 * sizeof(u64) + KVMLU_NR_VECTORS * sizeof(u32))

/*
 * A test build may define KVMLU_VAPIC_LOAD_CLEARS_PIR() to make LOAD clear
 * PIR as upstream KVM's LAPIC restore does, to show what that loses. The
 * vAPIC modules never do.
 */
#ifndef KVMLU_VAPIC_LOAD_CLEARS_PIR
#define KVMLU_VAPIC_LOAD_CLEARS_PIR()	false
#endif

/**
 * struct kvmlu_vapic_regs - one vCPU's virtual APIC interrupt state
 * @irr: Interrupt Request Register, a 256-bit map.
 * @isr: In-Service Register.
 * @tmr: Trigger Mode Register (format version 2).
 * @acked: Interrupts acknowledged, per vector (format version 2).
 */
struct kvmlu_vapic_regs {
	unsigned long irr[4];
	unsigned long isr[4];
	unsigned long tmr[4];
	u32 acked[KVMLU_NR_VECTORS];
};

/**
 * struct kvmlu_vapic - a vAPIC attached to a table
 * @table: The table; a reference is held.
 * @nr_vcpus: The table's vCPU count.
 * @lock: Protects @regs.
 * @regs: Per-vCPU state, @nr_vcpus entries.
 */
struct kvmlu_vapic {
	struct kvmlu_table *table;
	u32 nr_vcpus;
	struct mutex lock; /* see above */
	struct kvmlu_vapic_regs regs[];
};

static size_t kvmlu_vapic_record_size(unsigned int version)
{
	return version == 1 ? KVMLU_VAPIC_V1_RECORD : KVMLU_VAPIC_V2_RECORD;
}

static void kvmlu_vapic_fill(struct kvmlu_vapic *va, struct kvmlu_vapic_vcpu *out)
{
	struct kvmlu_vapic_regs *r = &va->regs[out->vcpu];
	int i;

	for (i = 0; i < 4; i++) {
		out->irr[i] = r->irr[i];
		out->isr[i] = r->isr[i];
		out->tmr[i] = KVMLU_VAPIC_VERSION >= 2 ? r->tmr[i] : 0;
	}
}

/* Highest set vector of a 256-bit map, or 0 if none (0..31 never post). */
static unsigned int kvmlu_vapic_highest(const unsigned long *map)
{
	unsigned long v = find_last_bit(map, KVMLU_NR_VECTORS);

	return v < KVMLU_NR_VECTORS ? v : 0;
}

static int kvmlu_vapic_vcpu_op(struct kvmlu_ucmd *ucmd, unsigned int op)
{
	struct kvmlu_vapic_vcpu *vv = ucmd->cmd;
	struct kvmlu_vapic *va = ucmd->obj;
	struct kvmlu_vapic_regs *r;
	unsigned int irr, isr;
	u64 pir[4];
	int i;

	if (vv->flags)
		return -EINVAL;
	if (vv->vcpu >= va->nr_vcpus)
		return -ERANGE;
	memset(vv->moved, 0, sizeof(vv->moved));
	vv->vector = 0;
	r = &va->regs[vv->vcpu];

	mutex_lock(&va->lock);
	switch (op) {
	case KVMLU_CMD_VAPIC_SYNC:
		kvmlu_table_take_pir(va->table, vv->vcpu, pir);
		for (i = 0; i < 4; i++) {
			r->irr[i] |= pir[i];
			vv->moved[i] = pir[i];
		}
		break;
	case KVMLU_CMD_VAPIC_ACK:
		/* Deliverable if its priority class is above the one in service. */
		irr = kvmlu_vapic_highest(r->irr);
		isr = kvmlu_vapic_highest(r->isr);
		if (irr && (!isr || irr >> 4 > isr >> 4)) {
			__clear_bit(irr, r->irr);
			__set_bit(irr, r->isr);
			if (KVMLU_VAPIC_VERSION >= 2)
				r->acked[irr]++;
			vv->vector = irr;
		}
		break;
	case KVMLU_CMD_VAPIC_EOI:
		isr = kvmlu_vapic_highest(r->isr);
		if (isr) {
			__clear_bit(isr, r->isr);
			vv->vector = isr;
		}
		break;
	}
	kvmlu_vapic_fill(va, vv);
	mutex_unlock(&va->lock);
	return kvmlu_ucmd_respond(ucmd, sizeof(*vv));
}

static int kvmlu_vapic_sync(struct kvmlu_ucmd *ucmd)
{
	return kvmlu_vapic_vcpu_op(ucmd, KVMLU_CMD_VAPIC_SYNC);
}

static int kvmlu_vapic_ack(struct kvmlu_ucmd *ucmd)
{
	return kvmlu_vapic_vcpu_op(ucmd, KVMLU_CMD_VAPIC_ACK);
}

static int kvmlu_vapic_eoi(struct kvmlu_ucmd *ucmd)
{
	return kvmlu_vapic_vcpu_op(ucmd, KVMLU_CMD_VAPIC_EOI);
}

static int kvmlu_vapic_get(struct kvmlu_ucmd *ucmd)
{
	return kvmlu_vapic_vcpu_op(ucmd, KVMLU_CMD_VAPIC_GET);
}

static u32 kvmlu_vapic_crc(const void *p, size_t len)
{
	return crc32_le(~0U, p, len) ^ ~0U;
}

static int kvmlu_vapic_save(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_vapic_save *sv = ucmd->cmd;
	struct kvmlu_vapic *va = ucmd->obj;
	unsigned int format = sv->format ? sv->format : KVMLU_VAPIC_VERSION;
	struct kvmlu_vapic_blob *hdr;
	size_t rec, size;
	u8 *blob, *p;
	u32 i;
	int ret;

	if (sv->flags || sv->reserved)
		return -EINVAL;
	if (format > KVMLU_VAPIC_VERSION)
		return -EPROTONOSUPPORT;
	rec = kvmlu_vapic_record_size(format);
	size = sizeof(*hdr) + va->nr_vcpus * rec;
	sv->blob_size = size;
	if (sv->buf_len < size) {
		ret = kvmlu_ucmd_respond(ucmd, sizeof(*sv));
		return ret ? ret : -ENOSPC;
	}
	blob = kvzalloc(size, GFP_KERNEL_ACCOUNT);
	if (!blob)
		return -ENOMEM;
	hdr = (struct kvmlu_vapic_blob *)blob;
	p = blob + sizeof(*hdr);
	mutex_lock(&va->lock);
	for (i = 0; i < va->nr_vcpus; i++, p += rec) {
		struct kvmlu_vapic_regs *r = &va->regs[i];

		/* Version 1 has no TMR: refuse rather than lose it. */
		if (format < 2 && !bitmap_empty(r->tmr, KVMLU_NR_VECTORS)) {
			mutex_unlock(&va->lock);
			kvfree(blob);
			return -EOPNOTSUPP;
		}
		memcpy(p, r->irr, sizeof(r->irr));
		memcpy(p + 32, r->isr, sizeof(r->isr));
		if (format >= 2) {
			memcpy(p + 64, r->tmr, sizeof(r->tmr));
			memcpy(p + 96, r->acked, sizeof(r->acked));
		}
	}
	mutex_unlock(&va->lock);
	hdr->magic = KVMLU_VAPIC_MAGIC;
	hdr->version = format;
	hdr->header_size = sizeof(*hdr);
	hdr->size = size;
	hdr->nr_vcpus = va->nr_vcpus;
	hdr->vcpu_size = rec;
	hdr->checksum = kvmlu_vapic_crc(blob + sizeof(*hdr), size - sizeof(*hdr));

	ret = copy_to_user(u64_to_user_ptr(sv->buf), blob, size) ? -EFAULT : 0;
	kvfree(blob);
	return ret ? ret : kvmlu_ucmd_respond(ucmd, sizeof(*sv));
}

/*
 * Check a blob's header against this module and @va; see the uAPI DOC.
 * @len is what userspace passed, @copied what was copied of it (at most a
 * version 2 blob of the largest table).
 */
static int kvmlu_vapic_check_blob(struct kvmlu_vapic *va, const u8 *blob,
				  size_t len, size_t copied)
{
	const struct kvmlu_vapic_blob *hdr = (const void *)blob;
	size_t rec;

	if (copied < sizeof(*hdr))
		return -EINVAL;
	if (hdr->magic != KVMLU_VAPIC_MAGIC)
		return -EBADMSG;
	if (hdr->version < 1 || hdr->version > KVMLU_VAPIC_VERSION)
		return -EPROTONOSUPPORT;
	rec = kvmlu_vapic_record_size(hdr->version);
	if (hdr->header_size != sizeof(*hdr) || hdr->vcpu_size != rec ||
	    hdr->size != sizeof(*hdr) + (u64)hdr->nr_vcpus * rec ||
	    hdr->size > len)
		return -EINVAL;
	/*
	 * A whole blob of more vCPUs than any table has is not for this one,
	 * in either format; it was not copied whole, so its checksum is not
	 * read. Below the limit, hdr->size <= @copied.
	 */
	if (hdr->nr_vcpus > KVMLU_MAX_VCPUS)
		return -ERANGE;
	if (kvmlu_vapic_crc(blob + sizeof(*hdr), hdr->size - sizeof(*hdr)) !=
	    hdr->checksum)
		return -EBADMSG;
	if (hdr->nr_vcpus != va->nr_vcpus)
		return -ERANGE;
	return 0;
}

/* Vectors 0..31 are exceptions: no record may hold one pending or in service. */
static int kvmlu_vapic_check_records(const struct kvmlu_vapic_blob *hdr,
				     const u8 *p)
{
	u32 i, m;
	u64 w;

	for (i = 0; i < hdr->nr_vcpus; i++, p += hdr->vcpu_size) {
		/* IRR, ISR, TMR (v2): vectors 0..31 are their word 0's low half. */
		for (m = 0; m < (hdr->version >= 2 ? 3 : 2); m++) {
			memcpy(&w, p + m * 4 * sizeof(u64), sizeof(w));
			if (lower_32_bits(w))
				return -EINVAL;
		}
	}
	return 0;
}

static int kvmlu_vapic_load(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_vapic_load *ld = ucmd->cmd;
	struct kvmlu_vapic *va = ucmd->obj;
	size_t max = sizeof(struct kvmlu_vapic_blob) +
		     KVMLU_MAX_VCPUS * KVMLU_VAPIC_V2_RECORD;
	const struct kvmlu_vapic_blob *hdr;
	size_t len = ld->buf_len;
	const u8 *p;
	u64 pir[4];
	u8 *blob;
	u32 i;
	int ret;

	if (ld->flags || ld->reserved)
		return -EINVAL;
	/*
	 * Nothing valid is longer than a version 2 blob of the largest table.
	 * Not this table's: a whole blob of a larger one must reach the checks
	 * and get ERANGE, not look truncated (EINVAL).
	 */
	blob = vmemdup_user(u64_to_user_ptr(ld->buf), min(len, max));
	if (IS_ERR(blob))
		return PTR_ERR(blob);
	ret = kvmlu_vapic_check_blob(va, blob, len, min(len, max));
	if (ret)
		goto out;
	hdr = (const void *)blob;
	p = blob + sizeof(*hdr);
	ret = kvmlu_vapic_check_records(hdr, p);
	if (ret)
		goto out;

	mutex_lock(&va->lock);
	for (i = 0; i < va->nr_vcpus; i++, p += hdr->vcpu_size) {
		struct kvmlu_vapic_regs *r = &va->regs[i];

		memset(r, 0, sizeof(*r));
		memcpy(r->irr, p, sizeof(r->irr));
		memcpy(r->isr, p + 32, sizeof(r->isr));
		if (KVMLU_VAPIC_VERSION >= 2 && hdr->version >= 2) {
			memcpy(r->tmr, p + 64, sizeof(r->tmr));
			memcpy(r->acked, p + 96, sizeof(r->acked));
		}
		/* Upstream KVM's behaviour, in a test build only: PIR is lost. */
		if (KVMLU_VAPIC_LOAD_CLEARS_PIR())
			kvmlu_table_take_pir(va->table, i, pir);
	}
	mutex_unlock(&va->lock);
out:
	kvfree(blob);
	return ret;
}

static const struct kvmlu_ioctl_op kvmlu_vapic_ops[] = {
	KVMLU_IOCTL_OP(KVMLU_VAPIC_CMD_BASE, KVMLU_VAPIC_SYNC, kvmlu_vapic_sync,
		       KVMLU_VAPIC_VCPU_ARG, KVMLU_VAPIC_VCPU_LAST),
	KVMLU_IOCTL_OP(KVMLU_VAPIC_CMD_BASE, KVMLU_VAPIC_ACK, kvmlu_vapic_ack,
		       KVMLU_VAPIC_VCPU_ARG, KVMLU_VAPIC_VCPU_LAST),
	KVMLU_IOCTL_OP(KVMLU_VAPIC_CMD_BASE, KVMLU_VAPIC_EOI, kvmlu_vapic_eoi,
		       KVMLU_VAPIC_VCPU_ARG, KVMLU_VAPIC_VCPU_LAST),
	KVMLU_IOCTL_OP(KVMLU_VAPIC_CMD_BASE, KVMLU_VAPIC_GET, kvmlu_vapic_get,
		       KVMLU_VAPIC_VCPU_ARG, KVMLU_VAPIC_VCPU_LAST),
	KVMLU_IOCTL_OP(KVMLU_VAPIC_CMD_BASE, KVMLU_VAPIC_SAVE, kvmlu_vapic_save,
		       struct kvmlu_vapic_save, reserved),
	KVMLU_IOCTL_OP_IN(KVMLU_VAPIC_CMD_BASE, KVMLU_VAPIC_LOAD,
			  kvmlu_vapic_load, struct kvmlu_vapic_load, reserved),
};

static long kvmlu_vapic_ioctl(struct file *file, unsigned int cmd,
			      unsigned long arg)
{
	return kvmlu_ioctl_dispatch(kvmlu_vapic_ops, ARRAY_SIZE(kvmlu_vapic_ops),
				    KVMLU_VAPIC_CMD_BASE, cmd, arg,
				    file->private_data);
}

static int kvmlu_vapic_release(struct inode *inode, struct file *file)
{
	struct kvmlu_vapic *va = file->private_data;

	kvmlu_table_put(va->table);
	mutex_destroy(&va->lock);
	kvfree(va);
	return 0;
}

static const struct file_operations kvmlu_vapic_fops = {
	.owner = THIS_MODULE,
	.release = kvmlu_vapic_release,
	.unlocked_ioctl = kvmlu_vapic_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

static int kvmlu_vapic_query(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_vapic_query *q = ucmd->cmd;

	if (q->flags)
		return -EINVAL;
	q->version = KVMLU_VAPIC_VERSION;
	q->min_load_version = 1;
	q->vcpu_record_size = kvmlu_vapic_record_size(KVMLU_VAPIC_VERSION);
	q->reserved = 0;
	return kvmlu_ucmd_respond(ucmd, sizeof(*q));
}

static int kvmlu_create_vapic(struct kvmlu_ucmd *ucmd)
{
	struct kvmlu_create_vapic *cv = ucmd->cmd;
	struct kvmlu_table *table;
	struct kvmlu_vapic *va;
	struct file *file;
	int fd, ret;

	if (cv->flags)
		return -EINVAL;
	table = kvmlu_table_from_fd(cv->table_fd);
	if (IS_ERR(table))
		return PTR_ERR(table);
	va = kvzalloc(struct_size(va, regs, kvmlu_table_nr_vcpus(table)),
		      GFP_KERNEL_ACCOUNT);
	if (!va) {
		ret = -ENOMEM;
		goto err_put_table;
	}
	va->table = table;
	va->nr_vcpus = kvmlu_table_nr_vcpus(table);
	mutex_init(&va->lock);

	fd = get_unused_fd_flags(O_CLOEXEC);
	if (fd < 0) {
		ret = fd;
		goto err_free;
	}
	file = anon_inode_getfile("[" KVMLU_VAPIC_NAME "]", &kvmlu_vapic_fops,
				  va, O_RDWR);
	if (IS_ERR(file)) {
		ret = PTR_ERR(file);
		goto err_put_fd;
	}
	cv->fd = fd;
	/* On failure the file's release frees @va and drops the table. */
	return kvmlu_ucmd_reply_fd(ucmd, sizeof(*cv), fd, file);

err_put_fd:
	put_unused_fd(fd);
err_free:
	mutex_destroy(&va->lock);
	kvfree(va);
err_put_table:
	kvmlu_table_put(table);
	return ret;
}

static const struct kvmlu_ioctl_op kvmlu_vapic_dev_ops[] = {
	KVMLU_IOCTL_OP(KVMLU_VAPIC_DEV_CMD_BASE, KVMLU_VAPIC_QUERY,
		       kvmlu_vapic_query, struct kvmlu_vapic_query, reserved),
	KVMLU_IOCTL_OP(KVMLU_VAPIC_DEV_CMD_BASE, KVMLU_CREATE_VAPIC,
		       kvmlu_create_vapic, struct kvmlu_create_vapic, fd),
};

static long kvmlu_vapic_dev_ioctl(struct file *file, unsigned int cmd,
				  unsigned long arg)
{
	return kvmlu_ioctl_dispatch(kvmlu_vapic_dev_ops,
				    ARRAY_SIZE(kvmlu_vapic_dev_ops),
				    KVMLU_VAPIC_DEV_CMD_BASE, cmd, arg, NULL);
}

static const struct file_operations kvmlu_vapic_dev_fops = {
	.owner = THIS_MODULE,
	.open = nonseekable_open,
	.unlocked_ioctl = kvmlu_vapic_dev_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice kvmlu_vapic_miscdev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = KVMLU_VAPIC_NAME,
	.fops = &kvmlu_vapic_dev_fops,
	.mode = 0600,
};

/*
 * Refuse a kvmlu.ko this module was not built for, before anything of it is
 * used, and have it check both dispatch tables against its own buffer.
 */
static int __init kvmlu_vapic_init(void)
{
	unsigned int kapi = kvmlu_kapi_version();
	int ret;

	if (kapi != KVMLU_KAPI_VERSION) {
		pr_err("built for kvmlu interface version %u, the loaded kvmlu.ko has version %u\n",
		       KVMLU_KAPI_VERSION, kapi);
		return -EPROTO;
	}
	ret = kvmlu_ioctl_ops_check(KBUILD_MODNAME, kvmlu_vapic_dev_ops,
				    ARRAY_SIZE(kvmlu_vapic_dev_ops),
				    KVMLU_VAPIC_DEV_CMD_BASE);
	if (ret)
		return ret;
	ret = kvmlu_ioctl_ops_check(KBUILD_MODNAME, kvmlu_vapic_ops,
				    ARRAY_SIZE(kvmlu_vapic_ops),
				    KVMLU_VAPIC_CMD_BASE);
	if (ret)
		return ret;
	ret = misc_register(&kvmlu_vapic_miscdev);
	if (ret)
		pr_err("cannot register /dev/%s: %d\n", KVMLU_VAPIC_NAME, ret);
	return ret;
}

static void __exit kvmlu_vapic_exit(void)
{
	misc_deregister(&kvmlu_vapic_miscdev);
}

module_init(kvmlu_vapic_init);
module_exit(kvmlu_vapic_exit);

MODULE_LICENSE("GPL");
MODULE_IMPORT_NS(KVMLU_NS);
MODULE_DESCRIPTION("kvmlu: virtual APIC state, save format version "
		   __stringify(KVMLU_VAPIC_VERSION));
