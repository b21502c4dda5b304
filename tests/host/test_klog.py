"""Tests of pyctl.klog, the kernel-log scanner, on realistic report and boot lines."""

from __future__ import annotations

import pytest

from pyctl import klog

# Header lines of real kernel reports (6.1-era formats), as dmesg prints them.
POSITIVES = [
    "[   42.123456] WARNING: CPU: 0 PID: 1 at fake",
    "[   42.123456] WARNING: CPU: 1 PID: 312 at kmod/kvmlu_main.c:210 kvmlu_ioctl+0x5a/0x1f0",
    "[   12.000001] BUG: kernel NULL pointer dereference, address: 0000000000000008",
    "[   12.000002] BUG: unable to handle page fault for address: ffffc90000123000",
    "[   12.000003] BUG: sleeping function called from invalid context at mm/slab.h:723",
    "[   12.000004] BUG: scheduling while atomic: python3/377/0x00000002",
    "[   12.000005] BUG: spinlock bad magic on CPU#1, python3/377",
    "[   12.000007] BUG: KASAN: slab-out-of-bounds in kvmlu_post+0x4b/0x120 [kvmlu]",
    "[   12.000008] BUG: KASAN: use-after-free in kvmlu_binding_wake+0x33/0x90 [kvmlu]",
    "[   12.000009] KASAN: null-ptr-deref in range [0x0000000000000010-0x0000000000000017]",
    "[   12.000010] kernel BUG at kmod/kvmlu_table.c:88!",
    "[   12.000011] invalid opcode: 0000 [#1] PREEMPT SMP NOPTI",
    "[   12.000012] Oops: 0002 [#1] PREEMPT SMP NOPTI",
    "[   12.000013] general protection fault, probably for non-canonical address "
    "0xdffffc0000000002: 0000 [#1] PREEMPT SMP KASAN NOPTI",
    "[   12.000014] Oops: general protection fault, probably for non-canonical address 0x1: 0000",
    "[   12.000015] WARNING: possible recursive locking detected",
    "[   12.000016] WARNING: possible circular locking dependency detected",
    "[   12.000017] WARNING: inconsistent lock state",
    "[   12.000018] WARNING: suspicious RCU usage",
    "[   12.000019] WARNING: bad unlock balance detected!",
    "[   12.000020] WARNING: lock held when returning to user space!",
    "[   12.000021] WARNING: HARDIRQ-safe -> HARDIRQ-unsafe lock order detected",
    "[   12.000022] INFO: lockdep is turned off.",
    "[   12.000023] DEBUG_LOCKS_WARN_ON(1)",
    "[   12.000024] UBSAN: array-index-out-of-bounds in kmod/kvmlu_table.c:140:9",
    "[   12.000025] UBSAN: shift-out-of-bounds in kmod/kvmlu_post.c:31:20",
    "[   12.000026] kmemleak: 2 new suspected memory leaks (see /sys/kernel/debug/kmemleak)",
    "unreferenced object 0xffff888003a8c000 (size 4096):",
    "[   12.000027] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [python3:377]",
    "[   12.000028] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
    "[   12.000029] INFO: task python3:377 blocked for more than 120 seconds.",
    "[   12.000030] Kernel panic - not syncing: Fatal exception in interrupt",
    "[   12.000031] refcount_t: underflow; use-after-free.",
    "[   12.000032] list_del corruption, ffff888003a8c000->next is LIST_POISON1 (dead000000000100)",
    "[   12.000033] Watchdog detected hard LOCKUP on cpu 1",
    # Other framings of the same kind of line.
    "WARNING: CPU: 0 PID: 1 at fake",
    "4,1234,42123456,-;WARNING: CPU: 0 PID: 1 at fake",
    "<4>WARNING: CPU: 0 PID: 1 at fake",
    "[   42.123456] [  T312] WARNING: CPU: 1 PID: 312 at mm/slub.c:4500 kfree+0x1/0x2",
    "[   42.123456] BUG: KASAN: double-free in kvmlu_table_release+0x20/0x40 [kvmlu]\n",
]

# Ordinary lines: boot, module load, VFIO, and the context lines of a report.
NEGATIVES = [
    "[    0.000000] Linux version 6.1.0-56-amd64 (debian-kernel@lists.debian.org)",
    "[    0.000000] x86/cpu: User Mode Instruction Prevention (UMIP) activated",
    "[    0.000000] x86/fpu: Supporting XSAVE feature 0x001: 'x87 floating point registers'",
    "[    0.060000] tsc: Unable to calibrate against PIT",
    "[    1.226733] mtrr: your CPUs had inconsistent fixed MTRR settings",
    "[    0.100000] RETBleed: WARNING: Spectre v2 mitigation leaves CPU vulnerable to RETBleed "
    "attacks, data leaks possible!",
    "[    0.100000] Spectre V2 : WARNING: Unprivileged eBPF is enabled with eIBRS on, data leaks "
    "possible via Spectre v2 BHB attacks!",
    "[    0.100000] MDS: Vulnerable: Clear CPU buffers attempted, no microcode",
    "[    0.200000] ACPI: PM-Timer IO Port: 0x608",
    "[    0.300000] [Firmware Bug]: TSC doesn't count with P0 frequency!",
    "[    0.400000] ACPI BIOS Error (bug): Could not resolve symbol [\\_SB.PCI0], AE_NOT_FOUND",
    "[    1.589911] iommu: Default domain type: Translated",
    "[    1.936910] DMAR: No RMRR found",
    "[    0.020000] DMAR-IR: Enabled IRQ remapping in xapic mode",
    "[    1.942764] pci 0000:00:04.0: Adding to iommu group 4",
    '[    3.424215] Unstable clock detected, switching default tracing clock to "global"',
    "[   20.000000] kvmlu: loading out-of-tree module taints kernel.",
    "[   20.000001] kvmlu: module verification failed: signature and/or required key missing "
    "- tainting kernel",
    "[   20.100000] VFIO - User Level meta-driver version: 0.3",
    "[   20.200000] vfio-pci 0000:00:0a.0: enabling device (0000 -> 0002)",
    "[   20.300000] kvmlu-guest: suite start",
    "[   21.000000] ------------[ cut here ]------------",
    "[   21.000001] Call Trace:",
    "[   21.000002]  <TASK>",
    "[   21.000003]  dump_stack_lvl+0x44/0x5c",
    "[   21.000004] Modules linked in: kvmlu(OE) vfio_pci vfio_pci_core vfio_iommu_type1 vfio",
    "[   21.000005] CPU: 0 PID: 1 Comm: sh Tainted: G           OE      6.1.0-56-amd64 #1",
    "[   21.000006] RIP: 0010:kvmlu_ioctl+0x5a/0x1f0 [kvmlu]",
    "[   21.000007] ---[ end trace 0000000000000000 ]---",
    "[   22.000000] traps: python3[377] general protection fault ip:7f0000 sp:7ffd0000 error:0 "
    "in libc.so.6[7f0000+155000]",
    "[   22.000001] python3[377]: segfault at 8 ip 00007f0000 sp 00007ffd0000 error 4",
    "[   22.000002] traps: sh[1] trap invalid opcode ip:55d0 sp:7ffd error:0 in sh[55d0+1000]",
    "[   22.000003] kasan: KernelAddressSanitizer initialized",
    "[   22.000004] kmemleak: Kernel memory leak detector initialized (mem pool available: 15)",
    "[   22.000005] kfence: initialized - using 2097152 bytes for 255 objects",
    "[   22.000006] reboot: Power down",
    "",
]


@pytest.mark.parametrize("line", POSITIVES)
def test_report_lines_are_findings(line: str) -> None:
    assert klog.classify(line) is not None
    assert klog.scan([line]) == [line.rstrip("\n")]


@pytest.mark.parametrize("line", NEGATIVES)
def test_ordinary_lines_are_not_findings(line: str) -> None:
    assert klog.classify(line) is None
    assert klog.scan([line]) == []


def test_scan_keeps_order_and_only_headers() -> None:
    report = [
        "[   21.000000] ------------[ cut here ]------------",
        "[   21.000001] WARNING: CPU: 0 PID: 1 at kmod/kvmlu_main.c:210 kvmlu_ioctl+0x5a/0x1f0",
        "[   21.000002] Modules linked in: kvmlu(OE)",
        "[   21.000003] Call Trace:",
        "[   21.000004]  <TASK>",
        "[   21.000005] ---[ end trace 0000000000000000 ]---",
        "[   22.000000] BUG: KASAN: use-after-free in kvmlu_post+0x4b/0x120 [kvmlu]",
        "[   22.000001] Read of size 8 at addr ffff888003a8c000 by task python3/377",
    ]
    assert klog.scan(report) == [report[1], report[6]]


def test_kinds() -> None:
    assert klog.classify("WARNING: CPU: 0 PID: 1 at fake") == "warning"
    assert klog.classify("BUG: KASAN: use-after-free in f+0x1/0x2") == "bug"
    assert klog.classify("UBSAN: shift-out-of-bounds in a.c:1:2") == "ubsan"
    assert klog.classify("unreferenced object 0xffff888003a8c000 (size 64):") == "kmemleak"
    assert klog.classify("WARNING: possible recursive locking detected") == "warning"
    assert klog.classify("  DEBUG_LOCKS_WARN_ON(1)") == "lockdep"


def test_message_of_strips_prefixes() -> None:
    assert klog.message_of("[   42.123456] hello") == "hello"
    assert klog.message_of("6,339,5140900,-;hello\n") == "hello"
    assert klog.message_of("<4>hello") == "hello"
    assert klog.message_of("[    1.000000] [    C1] hello") == "hello"
    assert klog.message_of("plain") == "plain"


def test_lines_after_marker() -> None:
    lines = ["boot WARNING: x", "kvmlu-guest: suite start", "a", "kvmlu-guest: suite start", "b"]
    assert klog.lines_after_marker(lines, "kvmlu-guest: suite start") == ["b"]
    assert klog.lines_after_marker(["a", "b"], "nope") == ["a", "b"]


def test_parse_kmsg_record() -> None:
    rec = klog.parse_kmsg_record("4,1234,42123456,-;WARNING: CPU: 0 PID: 1 at fake\n SUBSYSTEM=x\n")
    assert rec == klog.KmsgRecord(
        level=4, facility=0, seq=1234, usec=42123456, message="WARNING: CPU: 0 PID: 1 at fake"
    )
    assert rec.format() == "[   42.123456] WARNING: CPU: 0 PID: 1 at fake"
    user = klog.parse_kmsg_record("13,7,5,-;kvmlu-guest: suite start")
    assert user is not None
    assert (user.level, user.facility) == (5, 1)
    assert klog.parse_kmsg_record("no record here") is None
    assert klog.parse_kmsg_record("x,y,z;msg") is None


def test_main_scans_files(tmp_path, capsys) -> None:
    log = tmp_path / "console.log"
    log.write_text("[ 1.0] ok\n[ 2.0] WARNING: CPU: 0 PID: 1 at fake\n")
    assert klog.main([str(log)]) == 1
    assert "WARNING: CPU: 0 PID: 1 at fake" in capsys.readouterr().out
    clean = tmp_path / "clean.log"
    clean.write_text("[ 1.0] ok\n")
    assert klog.main([str(clean)]) == 0
