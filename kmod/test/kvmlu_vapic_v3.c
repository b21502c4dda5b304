// SPDX-License-Identifier: GPL-2.0
/*
 * kvmlu_vapic_v3.ko, for tests only: version 2's vAPIC under the next
 * version number, built against this tree's kvmlu.ko. It stands for a
 * correctly built successor, which loads on the running base and works.
 *
 * With probe_bounds set, every SYNC first asks kvmlu.ko for the PIR of the
 * vCPU just past the table's last, and leaves in probe_result what came of
 * it: the error kvmlu_table_take_pir() returned, or 0 if it accepted the
 * index.
 *
 * With clear_pir_on_load set, LOAD also clears PIR, as upstream KVM's LAPIC
 * restore does, so that a test can show the interrupt that loses.
 */
/* As kvmlu_vapic_core.c defines it, which the header below must not precede. */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/moduleparam.h>

#include "../kvmlu_internal.h"

static bool probe_bounds;
module_param(probe_bounds, bool, 0644);
MODULE_PARM_DESC(probe_bounds, "on SYNC, also take the PIR of a vCPU beyond the table");

static bool clear_pir_on_load;
module_param(clear_pir_on_load, bool, 0644);
MODULE_PARM_DESC(clear_pir_on_load, "LOAD clears PIR, losing interrupts (upstream KVM's way)");

static int probe_result;
module_param(probe_result, int, 0444);
MODULE_PARM_DESC(probe_result, "what kvmlu.ko answered the last probe (0: accepted)");

static int kvmlu_test_take_pir(struct kvmlu_table *table, u32 vcpu, u64 pir[4])
{
	if (READ_ONCE(probe_bounds)) {
		u64 beyond[4];
		int ret;

#ifdef KVMLU_KAPI_VERSION
		ret = kvmlu_table_take_pir(table, kvmlu_table_nr_vcpus(table),
					   beyond);
#else
		/* Built against a kvmlu.ko from before the bound check. */
		kvmlu_table_take_pir(table, kvmlu_table_nr_vcpus(table), beyond);
		ret = 0;
#endif
		WRITE_ONCE(probe_result, ret);
	}
#ifdef KVMLU_KAPI_VERSION
	return kvmlu_table_take_pir(table, vcpu, pir);
#else
	kvmlu_table_take_pir(table, vcpu, pir);
	return 0;
#endif
}

#define kvmlu_table_take_pir kvmlu_test_take_pir
#define KVMLU_VAPIC_LOAD_CLEARS_PIR() READ_ONCE(clear_pir_on_load)

#define KVMLU_VAPIC_VERSION 3
#include "../kvmlu_vapic_core.c"
