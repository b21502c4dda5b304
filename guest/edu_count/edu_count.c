// SPDX-License-Identifier: GPL-2.0
/*
 * edu_count: count the MSIs of QEMU's edu PCI device in a guest.
 *
 * The inner guest of kvmlu's nested-KVM test loads this driver. An edu
 * function passed through with vfio-pci raises MSIs when something (the
 * nested host, through the function's BAR, or this driver) writes its raise
 * register; the handler counts them per vector, keeps the ktime of the first
 * and the last, and acknowledges the device. What it counted is read from
 * sysfs, in the PCI device's folder:
 *
 *   irqs        read: one line per vector,
 *               "vector=I count=N nostatus=Z first_ns=F last_ns=L"
 *               (nostatus counts handler runs that found the status register
 *               zero: the bits had been acknowledged already)
 *   raise       write N (1..EDU_COUNT_MAX_SAMPLES): raise N MSIs from the
 *               guest, one at a time, each waited for; every raise records
 *               the time from just before the register write to the
 *               handler's entry, on the guest's clock. ETIMEDOUT if one
 *               does not arrive within EDU_COUNT_RAISE_TIMEOUT_MS.
 *   latency_ns  read: the samples of the last raise run, space-separated
 *   msi         read: the MSI message the function is programmed with,
 *               "enabled=E address=0xA data=0xD dest=I vector=V" (dest: the
 *               destination APIC ID of a compatibility-format address)
 *   msi_on      write 0: free the IRQs and turn MSI off in the function;
 *               write 1: allocate as many vectors as at probe again and
 *               request their IRQs (the guest then programs a new message)
 *   irq_mask    write 1: disable_irq() every vector; write 0: enable_irq().
 *               An MSI taken while disabled runs the handler once on enable.
 *
 * An MSI raised by someone else while a raise run waits is taken for the
 * awaited one: measure latency only while nobody else raises.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/completion.h>
#include <linux/device.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/jiffies.h>
#include <linux/kernel.h>
#include <linux/ktime.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/overflow.h>
#include <linux/pci.h>
#include <linux/spinlock.h>
#include <linux/sysfs.h>

#define EDU_VENDOR_ID		0x1234
#define EDU_DEVICE_ID		0x11e8

/* BAR0 registers (QEMU docs/specs/edu.rst); only 32-bit accesses below 0x80. */
#define EDU_REG_ID		0x00
#define EDU_REG_IRQ_STATUS	0x24
#define EDU_REG_IRQ_RAISE	0x60
#define EDU_REG_IRQ_ACK		0x64

/* The identification register reads 0xRRrr00ed. */
#define EDU_ID_MASK		0xffff
#define EDU_ID_VALUE		0x00ed

/* What a guest-initiated raise writes into the status register. */
#define EDU_COUNT_RAISE_BIT	BIT(0)

#define EDU_COUNT_MAX_VECTORS	32
/* Samples of one raise run; their decimal text fits one sysfs page. */
#define EDU_COUNT_MAX_SAMPLES	256
#define EDU_COUNT_RAISE_TIMEOUT_MS 1000

struct edu_count;

/**
 * struct edu_count_vector - what one MSI vector received
 * @ec: the device
 * @index: the vector's index in the device's MSI block
 * @count: handler runs. Protected by @ec->lock, as are the fields below.
 * @nostatus: handler runs that found the status register zero
 * @cpu: the CPU of the last handler run, -1 before it
 * @first_ns: ktime of the first handler run, 0 before it
 * @last_ns: ktime of the last handler run, 0 before it
 */
struct edu_count_vector {
	struct edu_count *ec;
	unsigned int index;
	u64 count;
	u64 nostatus;
	int cpu;
	u64 first_ns;
	u64 last_ns;
};

/**
 * struct edu_count - one bound edu function
 * @pdev: the PCI function
 * @bar: BAR0, mapped
 * @lock: protects every vector's counters and the raise fields @raise_pending,
 *	@raise_start_ns and @raise_latency_ns; taken in hard interrupt context
 * @raise_pending: a guest-initiated raise waits for its MSI
 * @raise_start_ns: ktime just before that raise's register write
 * @raise_latency_ns: handler entry minus @raise_start_ns of the last raise
 * @raised: completed by the handler that ends a pending raise
 * @raise_mutex: one raise run at a time; protects @samples and @nr_samples
 * @samples: the latencies of the last raise run
 * @nr_samples: how many of @samples are valid
 * @state_mutex: orders the @enabled and @masked changes and raise runs;
 *	protects @enabled and @masked
 * @enabled: MSI is on and the IRQs are requested
 * @masked: every IRQ is disabled (disable_irq())
 * @nvec: MSI vectors allocated at probe; enabling again asks for as many
 * @vec: per-vector counters, @nvec of them
 */
struct edu_count {
	struct pci_dev *pdev;
	void __iomem *bar;
	spinlock_t lock;		/* counters and raise fields; hard IRQ */
	bool raise_pending;
	u64 raise_start_ns;
	u64 raise_latency_ns;
	struct completion raised;
	struct mutex raise_mutex;	/* one raise run; samples */
	u64 samples[EDU_COUNT_MAX_SAMPLES];
	unsigned int nr_samples;
	struct mutex state_mutex;	/* enabled, masked */
	bool enabled;
	bool masked;
	unsigned int nvec;
	struct edu_count_vector vec[];
};

static irqreturn_t edu_count_irq(int irq, void *data)
{
	struct edu_count_vector *v = data;
	struct edu_count *ec = v->ec;
	u64 now = ktime_get_ns();
	u32 status;

	/*
	 * Every write of the raise register sends an MSI, whatever the status
	 * bits were, so every handler run is one interrupt. Acknowledging
	 * clears the bits that were read; a raise after the read sets them
	 * again and brings its own MSI.
	 */
	status = ioread32(ec->bar + EDU_REG_IRQ_STATUS);
	if (status)
		iowrite32(status, ec->bar + EDU_REG_IRQ_ACK);

	spin_lock(&ec->lock);
	v->count++;
	if (!status)
		v->nostatus++;
	if (!v->first_ns)
		v->first_ns = now;
	v->last_ns = now;
	v->cpu = raw_smp_processor_id();
	if (ec->raise_pending) {
		ec->raise_pending = false;
		ec->raise_latency_ns = now - ec->raise_start_ns;
		complete(&ec->raised);
	}
	spin_unlock(&ec->lock);
	return IRQ_HANDLED;
}

static ssize_t irqs_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct edu_count *ec = dev_get_drvdata(dev);
	struct edu_count_vector snap;
	unsigned int i;
	int len = 0;

	for (i = 0; i < ec->nvec; i++) {
		spin_lock_irq(&ec->lock);
		snap = ec->vec[i];
		spin_unlock_irq(&ec->lock);
		len += sysfs_emit_at(buf, len,
				     "vector=%u count=%llu nostatus=%llu cpu=%d first_ns=%llu last_ns=%llu\n",
				     snap.index, snap.count, snap.nostatus, snap.cpu,
				     snap.first_ns, snap.last_ns);
	}
	return len;
}
static DEVICE_ATTR_RO(irqs);

/* One guest-initiated raise; its latency in *latency_ns. Under raise_mutex. */
static int edu_count_raise_one(struct edu_count *ec, u64 *latency_ns)
{
	unsigned long left;

	reinit_completion(&ec->raised);
	spin_lock_irq(&ec->lock);
	ec->raise_pending = true;
	ec->raise_start_ns = ktime_get_ns();
	spin_unlock_irq(&ec->lock);

	iowrite32(EDU_COUNT_RAISE_BIT, ec->bar + EDU_REG_IRQ_RAISE);

	left = wait_for_completion_timeout(&ec->raised,
					   msecs_to_jiffies(EDU_COUNT_RAISE_TIMEOUT_MS));
	spin_lock_irq(&ec->lock);
	/* The handler may have run between the timeout and this lock. */
	if (!left && ec->raise_pending) {
		ec->raise_pending = false;
		spin_unlock_irq(&ec->lock);
		return -ETIMEDOUT;
	}
	*latency_ns = ec->raise_latency_ns;
	spin_unlock_irq(&ec->lock);
	return 0;
}

static ssize_t raise_store(struct device *dev, struct device_attribute *attr,
			   const char *buf, size_t count)
{
	struct edu_count *ec = dev_get_drvdata(dev);
	unsigned int n, i;
	int ret;

	ret = kstrtouint(buf, 0, &n);
	if (ret)
		return ret;
	if (!n || n > EDU_COUNT_MAX_SAMPLES)
		return -ERANGE;

	ret = mutex_lock_interruptible(&ec->state_mutex);
	if (ret)
		return ret;
	/* A disabled or masked function's MSI never reaches the handler. */
	if (!ec->enabled || ec->masked) {
		mutex_unlock(&ec->state_mutex);
		return -EBUSY;
	}
	ret = mutex_lock_interruptible(&ec->raise_mutex);
	if (ret) {
		mutex_unlock(&ec->state_mutex);
		return ret;
	}
	ec->nr_samples = 0;
	for (i = 0; i < n; i++) {
		ret = edu_count_raise_one(ec, &ec->samples[i]);
		if (ret) {
			pci_warn(ec->pdev, "raise %u of %u: no MSI within %d ms\n",
				 i + 1, n, EDU_COUNT_RAISE_TIMEOUT_MS);
			break;
		}
		ec->nr_samples = i + 1;
	}
	mutex_unlock(&ec->raise_mutex);
	mutex_unlock(&ec->state_mutex);
	return ret ? ret : count;
}
static DEVICE_ATTR_WO(raise);

static ssize_t latency_ns_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct edu_count *ec = dev_get_drvdata(dev);
	unsigned int i;
	int len = 0;
	int ret;

	ret = mutex_lock_interruptible(&ec->raise_mutex);
	if (ret)
		return ret;
	for (i = 0; i < ec->nr_samples; i++)
		len += sysfs_emit_at(buf, len, "%s%llu", i ? " " : "", ec->samples[i]);
	len += sysfs_emit_at(buf, len, "\n");
	mutex_unlock(&ec->raise_mutex);
	return len;
}
static DEVICE_ATTR_RO(latency_ns);

static ssize_t msi_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct pci_dev *pdev = to_pci_dev(dev);
	int pos = pdev->msi_cap;
	u32 lo, hi = 0;
	u16 flags, data;

	if (!pos)
		return -ENODEV;
	pci_read_config_word(pdev, pos + PCI_MSI_FLAGS, &flags);
	pci_read_config_dword(pdev, pos + PCI_MSI_ADDRESS_LO, &lo);
	if (flags & PCI_MSI_FLAGS_64BIT) {
		pci_read_config_dword(pdev, pos + PCI_MSI_ADDRESS_HI, &hi);
		pci_read_config_word(pdev, pos + PCI_MSI_DATA_64, &data);
	} else {
		pci_read_config_word(pdev, pos + PCI_MSI_DATA_32, &data);
	}
	/* Compatibility format: destination ID in bits 19:12, vector in 7:0. */
	return sysfs_emit(buf, "enabled=%d address=%#llx data=%#x dest=%u vector=%u\n",
			  !!(flags & PCI_MSI_FLAGS_ENABLE), ((u64)hi << 32) | lo, data,
			  (lo >> 12) & 0xff, data & 0xff);
}
static DEVICE_ATTR_RO(msi);

/* Turn MSI on with @ec->nvec vectors and request their IRQs. */
static int edu_count_irqs_on(struct edu_count *ec)
{
	struct pci_dev *pdev = ec->pdev;
	unsigned int i;
	int nvec;
	int ret;

	nvec = pci_alloc_irq_vectors(pdev, ec->nvec, ec->nvec, PCI_IRQ_MSI);
	if (nvec < 0) {
		pci_err(pdev, "%u MSI vector(s): %d\n", ec->nvec, nvec);
		return nvec;
	}
	for (i = 0; i < ec->nvec; i++) {
		ret = request_irq(pci_irq_vector(pdev, i), edu_count_irq, 0, KBUILD_MODNAME,
				  &ec->vec[i]);
		if (ret) {
			pci_err(pdev, "request_irq of vector %u: %d\n", i, ret);
			while (i--)
				free_irq(pci_irq_vector(pdev, i), &ec->vec[i]);
			pci_free_irq_vectors(pdev);
			return ret;
		}
	}
	ec->enabled = true;
	return 0;
}

/* Free the IRQs and turn MSI off; an IRQ disabled by mask is enabled first. */
static void edu_count_irqs_off(struct edu_count *ec)
{
	unsigned int i;

	for (i = 0; i < ec->nvec; i++) {
		if (ec->masked)
			enable_irq(pci_irq_vector(ec->pdev, i));
		free_irq(pci_irq_vector(ec->pdev, i), &ec->vec[i]);
	}
	ec->masked = false;
	pci_free_irq_vectors(ec->pdev);
	ec->enabled = false;
}

static ssize_t msi_on_store(struct device *dev, struct device_attribute *attr,
			    const char *buf, size_t count)
{
	struct edu_count *ec = dev_get_drvdata(dev);
	bool on;
	int ret;

	ret = kstrtobool(buf, &on);
	if (ret)
		return ret;
	ret = mutex_lock_interruptible(&ec->state_mutex);
	if (ret)
		return ret;
	if (on && !ec->enabled)
		ret = edu_count_irqs_on(ec);
	else if (!on && ec->enabled)
		edu_count_irqs_off(ec);
	mutex_unlock(&ec->state_mutex);
	return ret ? ret : count;
}
static DEVICE_ATTR_WO(msi_on);

static ssize_t irq_mask_store(struct device *dev, struct device_attribute *attr,
			      const char *buf, size_t count)
{
	struct edu_count *ec = dev_get_drvdata(dev);
	unsigned int i;
	bool mask;
	int ret;

	ret = kstrtobool(buf, &mask);
	if (ret)
		return ret;
	ret = mutex_lock_interruptible(&ec->state_mutex);
	if (ret)
		return ret;
	if (!ec->enabled) {
		ret = -EBUSY;
	} else if (mask != ec->masked) {
		for (i = 0; i < ec->nvec; i++) {
			if (mask)
				disable_irq(pci_irq_vector(ec->pdev, i));
			else
				enable_irq(pci_irq_vector(ec->pdev, i));
		}
		ec->masked = mask;
	}
	mutex_unlock(&ec->state_mutex);
	return ret ? ret : count;
}
static DEVICE_ATTR_WO(irq_mask);

static struct attribute *edu_count_attrs[] = {
	&dev_attr_irqs.attr,
	&dev_attr_raise.attr,
	&dev_attr_latency_ns.attr,
	&dev_attr_msi.attr,
	&dev_attr_msi_on.attr,
	&dev_attr_irq_mask.attr,
	NULL,
};
ATTRIBUTE_GROUPS(edu_count);

static int edu_count_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct edu_count *ec;
	unsigned int i;
	u32 ident;
	int nvec;
	int ret;

	/* Managed: the BAR mapping goes with the device; the IRQs go in remove. */
	ret = pcim_enable_device(pdev);
	if (ret)
		return ret;
	ret = pcim_iomap_regions(pdev, BIT(0), KBUILD_MODNAME);
	if (ret)
		return ret;

	ident = ioread32(pcim_iomap_table(pdev)[0] + EDU_REG_ID);
	if ((ident & EDU_ID_MASK) != EDU_ID_VALUE) {
		pci_err(pdev, "identification register reads %#x, not an edu\n", ident);
		return -ENODEV;
	}
	pci_set_master(pdev);

	/* How many vectors the function offers; edu_count_irqs_on() asks for them. */
	nvec = pci_msi_vec_count(pdev);
	if (nvec < 0) {
		pci_err(pdev, "no MSI capability: %d\n", nvec);
		return nvec;
	}
	nvec = min(nvec, EDU_COUNT_MAX_VECTORS);

	ec = devm_kzalloc(&pdev->dev, struct_size(ec, vec, nvec), GFP_KERNEL);
	if (!ec)
		return -ENOMEM;
	ec->pdev = pdev;
	ec->bar = pcim_iomap_table(pdev)[0];
	ec->nvec = nvec;
	spin_lock_init(&ec->lock);
	init_completion(&ec->raised);
	mutex_init(&ec->raise_mutex);
	mutex_init(&ec->state_mutex);
	for (i = 0; i < nvec; i++) {
		ec->vec[i].ec = ec;
		ec->vec[i].index = i;
		ec->vec[i].cpu = -1;
	}
	/* The attributes appear after probe returns; drvdata is set before. */
	pci_set_drvdata(pdev, ec);

	ret = edu_count_irqs_on(ec);
	if (ret)
		return ret;
	pci_info(pdev, "edu %#x counting MSIs on %d vector(s), first IRQ %d\n",
		 ident, nvec, pci_irq_vector(pdev, 0));
	return 0;
}

static void edu_count_remove(struct pci_dev *pdev)
{
	struct edu_count *ec = pci_get_drvdata(pdev);

	mutex_lock(&ec->state_mutex);
	if (ec->enabled)
		edu_count_irqs_off(ec);
	mutex_unlock(&ec->state_mutex);
}

static const struct pci_device_id edu_count_ids[] = {
	{ PCI_DEVICE(EDU_VENDOR_ID, EDU_DEVICE_ID) },
	{ }
};
MODULE_DEVICE_TABLE(pci, edu_count_ids);

static struct pci_driver edu_count_driver = {
	.name = KBUILD_MODNAME,
	.id_table = edu_count_ids,
	.probe = edu_count_probe,
	.remove = edu_count_remove,
	.dev_groups = edu_count_groups,
};
module_pci_driver(edu_count_driver);

MODULE_DESCRIPTION("Count the MSIs of QEMU's edu device (kvmlu's nested-KVM guest)");
MODULE_AUTHOR("kvmlu");
MODULE_LICENSE("GPL");
