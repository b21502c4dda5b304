# SPDX-License-Identifier: GPL-2.0
#
# kvmlu: the README's commands. Everything installs what it needs first:
#   make demo   boot the test VM and run the demo
#   make test   host tests, then the kernel suite in one VM boot
#
# The kernel built against is the one the VM boots: KVER, Debian 12's own
# (the release linux-image-amd64 installs), else the newest installed
# /boot/vmlinuz-<ver> that has /lib/modules/<ver>/build. make test also runs
# the kernel suite on Debian 12's 6.12 (linux-image-6.12-amd64); KVER=<release>
# runs it on that kernel alone.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

APT_PACKAGES := qemu-system-x86 linux-image-amd64 linux-headers-amd64 \
	linux-image-6.12-amd64 linux-headers-6.12-amd64 dwarves sparse \
	kmod udev busybox-static make gcc libc6-dev libelf-dev python3 python3-venv python3-dev libffi-dev
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KVMLU := $(VENV)/bin/kvmlu
STAMPS := .stamps

# Evaluated when used, so a sub-make started after the packages are installed
# finds the kernels they brought. $(call meta_release,PKG): the release a
# Debian kernel metapackage installs, if its image and headers are there.
meta_release = $(shell v=$$(dpkg-query -W -f='$${Depends}' $(1) 2>/dev/null | \
	sed -n 's/^linux-image-\([^ ,]*\).*/\1/p'); \
	[ -n "$$v" ] && [ -e /boot/vmlinuz-$$v ] && [ -e /lib/modules/$$v/build ] && echo $$v)
newest_release = $(shell for v in $$(ls -1 /lib/modules 2>/dev/null | sort -V); do \
	[ -e /boot/vmlinuz-$$v ] && [ -e /lib/modules/$$v/build ] && echo $$v; done | tail -n 1)
KVER ?= $(or $(call meta_release,linux-image-amd64),$(newest_release))
KVER_6_12 ?= $(call meta_release,linux-image-6.12-amd64)
# The other kernels make test boots the kernel suite on, unless KVER was given.
OTHER_KVERS ?= $(if $(filter file,$(origin KVER)),$(filter-out $(KVER),$(KVER_6_12)))
KDIR ?= /lib/modules/$(KVER)/build
VM_ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
FUZZ_EXAMPLES ?= 10000
# make test's stateful fuzzer starts from this seed, so a red run replays;
# make fuzz draws a new one each time.
TEST_FUZZ_SEED ?= 20261129
# One boot of the kernel suite took 32 minutes (6.1) on an idle 2-core
# machine and 35 beside two busy loops (2026-12-08).
TEST_VM_TIMEOUT ?= 3600
FUZZ_MALFORMED ?= 2000
# Where make test-debug keeps its kernel tree (about 6 GB) between runs.
DEBUG_CACHE ?= /var/cache/kvmlu
# The modules built against it: in the checkout, which the VM sees.
DEBUG_MODULES := $(CURDIR)/build/debug-modules
DEBUG_APT_PACKAGES := linux-source-6.1 bc bison flex libssl-dev libelf-dev xz-utils
DEBUG_FUZZ_EXAMPLES ?= 200
# The suite's long loops, shortened on the debug kernel: every lock chain and
# allocation path is taken in the first rounds already.
DEBUG_SWITCHES ?= 200
DEBUG_SWAP_ROUNDS ?= 50

# Where make test-kernels keeps the newest Debian kernel (tools/newest-kernel.sh).
KERNEL_CACHE ?= /var/cache/kvmlu/kernels

# Where make qemu keeps QEMU's source, wheels and builds (about 1 GB) between
# runs; QEMU_BIN is the binary of the last build.
QEMU_CACHE ?= /var/cache/kvmlu/qemu
# The binary of the last build, copied into the checkout for the test VM.
QEMU_BIN := $(CURDIR)/build/qemu/qemu-system-x86_64

.PHONY: all deps venv modules guest-module sparse test test-host test-kernel test-kernel-on test-kernels test-qemu test-debug lint demo bench bench-qemu fuzz qemu clean help

all: modules

help:
	@echo "make demo | test | test-host | test-kernel | test-kernel-on | test-kernels | test-qemu | test-debug | bench | bench-qemu | fuzz | qemu | modules | sparse | lint | clean"

# Debian packages, installed only when one is missing.
deps: $(STAMPS)/apt
$(STAMPS)/apt: Makefile tools/apt-ensure.sh
	@mkdir -p $(STAMPS)
	tools/apt-ensure.sh $(APT_PACKAGES)
	@touch $@

# The venv with the package (the cffi extension is built here) and its test tools.
venv: $(STAMPS)/venv
$(STAMPS)/venv: $(STAMPS)/apt pyproject.toml setup.py pyctl/_build.py $(wildcard pyctl/decl/*.h) \
		kmod/include/uapi/linux/kvmlu.h
	@mkdir -p $(STAMPS)
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

# The modules, with W=1 and warnings as errors.
modules: deps
	@$(MAKE) --no-print-directory _modules

_modules:
	@[ -n "$(KVER)" ] || { echo "no kernel with headers found in /boot and /lib/modules" >&2; exit 1; }
	$(MAKE) -C $(KDIR) M=$(CURDIR) W=1 KCFLAGS=-Werror modules
	@$(MAKE) --no-print-directory guest-module

# The inner guest's edu MSI counter (kvmlu qemu), built against the kernel
# that guest boots: the same Debian kernel as the test VM's unless told.
GUEST_KVER ?= $(KVER)
guest-module:
	$(MAKE) -C /lib/modules/$(GUEST_KVER)/build M=$(CURDIR)/guest/edu_count W=1 \
		KCFLAGS=-Werror modules

# sparse over every module source, against each of SPARSE_KVERS (KVER and
# OTHER_KVERS), in copies of the sources (build/sparse/<release>/); any
# warning fails, and so does a kernel whose checker test refuses the sparse
# (Kbuild then skips it and says so). A kernel of KERNEL_CACHE is checked
# with the sparse tools/newest-kernel.sh names for it.
SPARSE_KVERS ?= $(KVER) $(OTHER_KVERS)
sparse: deps
	@for v in $(SPARSE_KVERS); do \
		chk=$$(sed -n 's/^KVMLU_KERNEL_CHECK=//p' $(KERNEL_CACHE)/$$v/kvmlu-kernel.env 2>/dev/null || true); \
		out=$$(tools/build-modules.sh $$v $(CURDIR)/build/sparse/$$v C=2 $${chk:+CHECK=$$chk} 2>&1) || \
			{ echo "$$out"; exit 1; }; \
		if grep -E ': (warning|error):|sparse is not available' <<<"$$out"; then exit 1; fi; \
		echo "sparse: clean against $$v"; done

lint: venv
	$(VENV)/bin/ruff check pyctl tests
	$(VENV)/bin/ruff format --check pyctl tests
	$(VENV)/bin/mypy

test: deps venv
	@$(MAKE) --no-print-directory _modules
	@$(MAKE) --no-print-directory sparse
	@$(MAKE) --no-print-directory qemu
	@$(MAKE) --no-print-directory test-host
	@$(MAKE) --no-print-directory test-kernel

test-host: venv
	$(VENV)/bin/ruff check pyctl tests
	$(VENV)/bin/mypy
	KVMLU_KERNEL=$(KVER) KVMLU_QEMU_CACHE=$(QEMU_CACHE) $(VENV)/bin/pytest tests/host $(PYTEST_ARGS)

# The whole kernel suite in one boot of the test VM on KVER, then in one boot
# on each of OTHER_KVERS.
test-kernel: venv
	@$(MAKE) --no-print-directory _modules
	@$(MAKE) --no-print-directory qemu
	$(KVMLU) vm --kernel $(KVER) --edu 3 --timeout $(TEST_VM_TIMEOUT) \
		--env KVMLU_FUZZ_SEED=$(TEST_FUZZ_SEED) $(VM_ARGS) -- \
		$(CURDIR)/$(PY) -m pytest -p no:cacheprovider tests/kernel $(PYTEST_ARGS)
	@for v in $(OTHER_KVERS); do $(MAKE) --no-print-directory test-kernel-on KV=$$v; done

# The kernel suite on kernel KV, with the modules built for it in a copy of
# the sources (build/kernels/KV/) and its results in results/vm-KV/. The
# inner QEMU runs the kvmlu path only (QEMU's own paths and stock
# cpr-transfer do not depend on the test VM's kernel), with 5 upgrades.
KMODS := kvmlu kvmlu_vapic_v1 kvmlu_vapic_v2
OTHER_KVER_ENV := KVMLU_QEMU_PATHS=kvmlu@tcg KVMLU_QEMU_UPGRADE_PATHS=kvmlu KVMLU_QEMU_UPGRADES=5
test-kernel-on: venv
	@[ -n "$(KV)" ] || { echo "test-kernel-on: KV=<kernel release> is needed" >&2; exit 2; }
	tools/build-modules.sh $(KV) $(CURDIR)/build/kernels/$(KV)
	$(KVMLU) vm --kernel $(KV) --edu 3 --timeout $(TEST_VM_TIMEOUT) \
		--results $(CURDIR)/results/vm-$(KV) \
		$(foreach m,$(KMODS),--module $(CURDIR)/build/kernels/$(KV)/kmod/$(m).ko) \
		--env KVMLU_FUZZ_SEED=$(TEST_FUZZ_SEED) $(foreach e,$(OTHER_KVER_ENV),--env $(e)) \
		$(VM_ARGS) -- $(CURDIR)/$(PY) -m pytest -p no:cacheprovider tests/kernel $(PYTEST_ARGS)

# The newest kernel Debian ships (NEWEST_KVER, else whatever is newest in
# trixie-backports and sid), which Debian 12 cannot install: unpacked by
# tools/newest-kernel.sh into KERNEL_CACHE (about 900 MB, 2 minutes the first
# time) with its module tools rebuilt here; the modules are built W=1 and
# sparse-checked against it, and the kernel suite runs on it in one boot
# after make test-kernel's boots on KVER and OTHER_KVERS.
NEWEST_KVER ?=
test-kernels: deps venv
	@$(MAKE) --no-print-directory test-kernel
	@rel=$$(tools/newest-kernel.sh $(KERNEL_CACHE) $(NEWEST_KVER) | tail -n 1); \
	$(MAKE) --no-print-directory sparse SPARSE_KVERS=$$rel && \
	$(MAKE) --no-print-directory test-kernel-on KV=$$rel

# The nested guest on all three interrupt paths (on, off, kvmlu) under the
# test VM's KVM with two vCPUs (off: one), and kvmlu under TCG, in one boot;
# then its QEMU live-upgraded on both paths under nested KVM. The kernel
# suite runs the guest and the upgrades under TCG only (see
# tests/kernel/test_qemu_guest.py): KVM nested in TCG lost guests here.
# These runs give the test VM a TCG thread per vCPU (NESTED_VM_ARGS): with
# one thread for both, guests with kernel-irqchip=on (on, stock) stopped at
# "Probing EDD" and never answered (2 boots of 2, 2026-12-08), while those
# with it off booted in 16-20 s.
NESTED_VM_ARGS ?= --tcg-threads multi
test-qemu: venv
	@$(MAKE) --no-print-directory _modules
	@$(MAKE) --no-print-directory qemu
	$(KVMLU) vm --kernel $(KVER) --edu 1 $(NESTED_VM_ARGS) \
		--env KVMLU_QEMU_PATHS=on,off,kvmlu,kvmlu@tcg \
		--env KVMLU_QEMU_CPUS=2 --env KVMLU_QEMU_ACCEL=kvm $(VM_ARGS) -- \
		$(CURDIR)/$(PY) -m pytest -p no:cacheprovider tests/kernel/test_qemu_guest.py \
		tests/kernel/test_qemu_upgrade.py $(PYTEST_ARGS)

# The demo. First the real thing: a guest under QEMU 10.2.2 (make qemu) in
# the nested-KVM test VM, its QEMU live-upgraded with cpr-transfer on the
# kvmlu path and on stock cpr-transfer, with edu MSIs raised between the
# upgrades and one inside every pause; each upgrade prints its pause and the
# guest's own count. Then the same without holding the pause open, which
# times the hand-over alone. Then the test VMM: descriptors and a bound MSI,
# and the live upgrade of an 88-vCPU test VMM, ten times with every
# optimisation and ten times without; each run prints its downtime and the
# checker's verdict.
DEMO_QEMU_UPGRADES ?= 3
# tcg: the guest under TCG inside the test VM; kvm: under its KVM (nested),
# which lost guests here now and then (docs/qemu-notes.md).
DEMO_QEMU_ACCEL ?= tcg

demo: deps venv
	@$(MAKE) --no-print-directory _modules
	@$(MAKE) --no-print-directory qemu
	$(KVMLU) vm --kernel $(KVER) --edu 3 $(VM_ARGS) -- /bin/sh -ec \
		'$(CURDIR)/$(KVMLU) qemu-upgrade --paths kvmlu,stock --upgrades $(DEMO_QEMU_UPGRADES) \
			--accel $(DEMO_QEMU_ACCEL); echo; \
		 $(CURDIR)/$(KVMLU) qemu-upgrade --paths kvmlu,stock --upgrades $(DEMO_QEMU_UPGRADES) \
			--accel $(DEMO_QEMU_ACCEL) --no-hold \
			--json "$$KVMLU_RESULTS/qemu-upgrade-no-hold.json"; echo; \
		 $(CURDIR)/$(KVMLU) demo; echo; \
		 $(CURDIR)/$(KVMLU) upgrade --vcpus 88 --upgrades 10 --raise-in-window; echo; \
		 $(CURDIR)/$(KVMLU) upgrade --vcpus 88 --upgrades 10 --raise-in-window --optimisations none'

# The fuzzers alone, at length: FUZZ_EXAMPLES programs of the stateful fuzzer
# and FUZZ_MALFORMED malformed calls in one VM boot, split over FUZZ_JOBS
# processes that run side by side.
FUZZ_JOBS ?= 2

fuzz: deps venv
	@$(MAKE) --no-print-directory _modules
	$(KVMLU) vm --kernel $(KVER) --edu 3 --timeout 43200 --results $(CURDIR)/results/fuzz \
		$(VM_ARGS) -- $(CURDIR)/tools/fuzz.sh $(CURDIR)/$(PY) $(FUZZ_JOBS) $(FUZZ_EXAMPLES) \
		$(FUZZ_MALFORMED) $(CURDIR)/results/fuzz $(PYTEST_ARGS)

# The kernel suite and the fuzzers on a debug kernel (KASAN, lockdep,
# might_sleep, kmemleak), built once into $(DEBUG_CACHE); any report fails.
$(STAMPS)/apt-debug: Makefile tools/apt-ensure.sh
	@mkdir -p $(STAMPS)
	tools/apt-ensure.sh $(DEBUG_APT_PACKAGES)
	@touch $@

test-debug: deps venv $(STAMPS)/apt-debug
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH tools/debug-kernel.sh $(DEBUG_CACHE) $(DEBUG_MODULES)
	$(KVMLU) vm --kernel $(DEBUG_CACHE)/linux-debug --memory 2048 --edu 3 --timeout 10800 \
		--require-kmemleak \
		--module $(DEBUG_MODULES)/kmod/kvmlu.ko \
		--module $(DEBUG_MODULES)/kmod/kvmlu_vapic_v1.ko \
		--module $(DEBUG_MODULES)/kmod/kvmlu_vapic_v2.ko \
		--results $(CURDIR)/results/debug --env KVMLU_FUZZ_EXAMPLES=$(DEBUG_FUZZ_EXAMPLES) \
		--env KVMLU_SWITCHES=$(DEBUG_SWITCHES) --env KVMLU_SWAP_ROUNDS=$(DEBUG_SWAP_ROUNDS) \
		$(VM_ARGS) -- $(CURDIR)/$(PY) -m pytest -p no:cacheprovider tests/kernel $(PYTEST_ARGS)

# The real VMM: QEMU 10.2.2 with qemu-patches/series and kvmlu's uAPI header,
# built into $(QEMU_CACHE) once per tarball, patch set and header (12-14
# minutes cold on 2 cores), and copied to QEMU_BIN in the checkout, which the
# test VM sees (it does not see /var/cache); prints QEMU_BIN.
qemu:
	tools/qemu-build.sh $(QEMU_CACHE)

# Benchmarks: numbers, not pass/fail. Results land in results/bench/; the
# upgrade benchmark's table and plot in docs/. BENCH_UPGRADE_ARGS narrows its
# matrix, e.g. "--vcpus 8 --workloads idle --upgrades 10".
BENCH_APT_PACKAGES := stress-ng memtester fio
BENCH_UPGRADE_ARGS ?=

$(STAMPS)/bench: $(STAMPS)/venv Makefile
	@mkdir -p $(STAMPS)
	tools/apt-ensure.sh $(BENCH_APT_PACKAGES)
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $@

bench: deps venv $(STAMPS)/bench
	@$(MAKE) --no-print-directory _modules
	$(KVMLU) vm --kernel $(KVER) --edu 3 --scratch-disk 512 --timeout 43200 \
		--results $(CURDIR)/results/bench $(VM_ARGS) -- /bin/sh -ec \
		'$(CURDIR)/$(KVMLU) bench irq $(BENCH_ARGS); \
		 $(CURDIR)/$(KVMLU) bench sessions --json $(CURDIR)/results/bench/sessions.json; \
		 $(CURDIR)/$(KVMLU) bench upgrade --json $(CURDIR)/results/bench/upgrade.json \
			$(BENCH_UPGRADE_ARGS)'
	$(KVMLU) bench report results/bench/upgrade.json \
		--markdown docs/bench/upgrade-table.md --png docs/bench/upgrade.png
	cp results/bench/upgrade.json docs/bench/upgrade.json
	@$(MAKE) --no-print-directory bench-qemu

# The nested guest's own MSI latency on the three interrupt paths (on, off,
# kvmlu), BENCH_QEMU_INTERRUPTS per path, and the host CPU per interrupt; then
# the pause of its QEMU's cpr-transfer, kvmlu's rows against stock, 50
# upgrades per row and workload (BENCH_QEMU_UPGRADE_ARGS narrows it, e.g.
# "--upgrades 20 --workloads idle").
BENCH_QEMU_INTERRUPTS ?= 1000
BENCH_QEMU_UPGRADE_ARGS ?=

bench-qemu: deps venv
	@$(MAKE) --no-print-directory _modules
	@$(MAKE) --no-print-directory qemu
	$(KVMLU) vm --kernel $(KVER) --edu 1 --timeout 14400 --results $(CURDIR)/results/bench \
		$(NESTED_VM_ARGS) $(VM_ARGS) -- /bin/sh -ec \
		'$(CURDIR)/$(KVMLU) bench qemu --interrupts $(BENCH_QEMU_INTERRUPTS) \
			--json $(CURDIR)/results/bench/qemu-latency.json \
			--markdown $(CURDIR)/results/bench/qemu-latency.md; \
		 $(CURDIR)/$(KVMLU) bench qemu-upgrade $(BENCH_QEMU_UPGRADE_ARGS) \
			--json $(CURDIR)/results/bench/qemu-upgrade.json \
			--markdown $(CURDIR)/results/bench/qemu-upgrade.md'
	cp results/bench/qemu-latency.json results/bench/qemu-latency.md \
		results/bench/qemu-upgrade.json results/bench/qemu-upgrade.md docs/bench/

clean:
	-[ -z "$(KVER)" ] || $(MAKE) -C $(KDIR) M=$(CURDIR) clean
	-[ -z "$(GUEST_KVER)" ] || $(MAKE) -C /lib/modules/$(GUEST_KVER)/build \
		M=$(CURDIR)/guest/edu_count clean
	rm -rf $(STAMPS) build *.egg-info pyctl/_kvmlu_cffi*.so pyctl/_kvmlu_cffi.c
