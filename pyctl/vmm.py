"""A test VMM process for handoffs, driven over a control socket.

``python -m pyctl.vmm --control-fd N --strategy S`` owns what a VMM owns for
its passthrough devices: a descriptor table, the devices' MSI eventfds
(programmed with VFIO_DEVICE_SET_IRQS) and the bindings between them. The
controller (a test, or ``kvmlu``) sends one JSON command per message, with fds
attached by SCM_RIGHTS where a command takes them, and gets one JSON reply.

Commands: ``setup`` (device fds attached: program MSIs, create the table,
bind), ``deliver`` (fetch every vCPU, report what was taken and when),
``export_begin`` then ``export_scm`` or ``export_session`` (the old side of
a handoff, in the strategy's way, to a peer socket or a session),
``import_scm`` or ``import_session`` (the new side), ``release`` (drop
everything after handing over), ``stats`` (binding counters),
``vapic_regs`` (IRR and ISR), ``exit``. With ``--vapic N`` the VMM keeps its
interrupt state in a vAPIC of module version N: its fetch is a SYNC, and
its state travels to the new VMM in a memfd.
Every reply carries the process's fd count.

The four strategies of the design:

``naive``
    the new VMM programs fresh eventfds and a fresh table; what was pending
    in the old table and what the device raised in between is lost.
``inject``
    the new VMM inherits the eventfds, binds them to a fresh table, and
    injects one interrupt per vector it owns: nothing is lost, but vectors
    that were not pending are invented.
``cpr``
    QEMU CPR style: the old VMM saves its pending vectors (fetching PIR) and
    unbinds; eventfd counters carry what comes after; the new VMM loads the
    saved vectors into a fresh table and binds. Interrupts posted between the
    save and the unbind are lost.
``shared``
    kvmlu: the table and bindings themselves are handed over; the new VMM
    attaches its notification targets and re-initialises nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from pyctl import handoff
from pyctl.kvmlu import Binding, Device, Table
from pyctl.uapi import lib
from pyctl.vapic import Vapic, VapicDevice
from pyctl.vfio import VfioPciDevice

STRATEGIES = ("naive", "inject", "cpr", "shared")
NOTIFY_VECTOR = 0xF2
#: The most fds one SCM_RIGHTS message carries (the kernel's SCM_MAX_FD).
SCM_MAX_FD = 253


def send_msg(sock: socket.socket, doc: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """One JSON message with optional fds."""
    body = json.dumps(doc).encode()
    socket.send_fds(sock, [len(body).to_bytes(4, "little") + body], list(fds))


def recv_msg(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, _, _ = socket.recv_fds(sock, 1 << 20, SCM_MAX_FD)
    if not data:
        raise EOFError("control socket closed")
    n = int.from_bytes(data[:4], "little")
    return json.loads(data[4 : 4 + n]), list(fds)


class TestVmm:
    """The state of one VMM and the strategy it hands over with."""

    def __init__(self, strategy: str, vapic: int | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}")
        self.strategy = strategy
        #: The vAPIC module version this VMM keeps its interrupt state in, if any.
        self.vapic_version = vapic
        self.vapic: Vapic | None = None
        self.vapic_state: int | None = None  # memfd with the saved vAPIC blob
        self.dev = Device()
        self.table: Table | None = None
        self.bindings: list[Binding] = []
        self.msi: list[int] = []
        self.devices: list[int] = []
        self.targets: list[tuple[int, int]] = []
        self.notify: list[int] = []
        self.saved: dict[str, list[int]] = {}

    # Set-up of a first VMM.

    def setup(self, device_fds: list[int], targets: list[list[int]], nr_vcpus: int) -> None:
        self.devices = device_fds
        self.targets = [(int(v), int(x)) for v, x in targets]
        self.table = self.dev.create_table(nr_vcpus)
        self._attach_notify(attach=False)
        for fd, (vcpu, vector) in zip(self.devices, self.targets, strict=True):
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            VfioPciDevice.from_device_fd("", os.dup(fd)).set_irq_eventfds(
                lib.VFIO_PCI_MSI_IRQ_INDEX, [efd]
            )
            self.msi.append(efd)
            self.bindings.append(self.table.bind(efd, vcpu, vector))
        self._create_vapic()

    def _create_vapic(self) -> None:
        if self.vapic_version is not None:
            assert self.table is not None
            with VapicDevice(self.vapic_version) as d:
                self.vapic = d.create(self.table)

    def _attach_notify(self, attach: bool) -> None:
        assert self.table is not None
        for v in range(self.table.nr_vcpus):
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.notify.append(fd)
            self.table.set_notify(v, fd, nv=NOTIFY_VECTOR, ndst=v, attach=attach)

    # The guest side: take what is pending.

    def deliver(self) -> list[list[Any]]:
        """Fetch every vCPU: ``[start time, vCPU, [vectors]]`` per fetch, empty ones too.

        With a vAPIC the fetch is its SYNC (PIR into IRR), then one ACK.
        """
        assert self.table is not None
        out: list[list[Any]] = []
        for v in range(self.table.nr_vcpus):
            t = time.monotonic()
            if self.vapic is not None:
                out.append([t, v, sorted(self.vapic.sync(v).moved)])
                self.vapic.ack(v)
            else:
                out.append([t, v, sorted(self.table.fetch(v))])
        return out

    def vapic_regs(self) -> list[dict[str, list[int]]]:
        """Each vCPU's IRR and ISR."""
        assert self.table is not None and self.vapic is not None
        regs = [self.vapic.get(v) for v in range(self.table.nr_vcpus)]
        return [{"irr": sorted(r.irr), "isr": sorted(r.isr)} for r in regs]

    # The old side of a handoff.

    def export_begin(self, vapic_format: int = 0) -> None:
        """Pause: from here the old VMM takes nothing more. cpr saves PIR now; a vAPIC
        saves its state into a memfd (in ``vapic_format``) and is closed."""
        assert self.table is not None
        if self.strategy == "cpr":
            self.saved = {str(v): sorted(self.table.fetch(v)) for v in range(self.table.nr_vcpus)}
        if self.vapic is not None:
            blob = self.vapic.save(vapic_format)
            self.vapic_state = os.memfd_create("kvmlu-vapic-state", os.MFD_CLOEXEC)
            os.write(self.vapic_state, blob)
            self.vapic.close()
            self.vapic = None

    def export_objects(self) -> tuple[dict[str, Any], list[int]]:
        """Unbind where the strategy does, and list what travels to the new VMM."""
        assert self.table is not None
        objs: list[tuple[str, str]] = []
        fds: list[int] = []
        if self.strategy != "shared":
            for b in self.bindings:
                b.close()
            self.bindings = []
        else:
            objs.append(("table", "table"))
            fds.append(self.table.fd)
            for i, b in enumerate(self.bindings):
                objs.append((f"binding{i}", "binding"))
                fds.append(b.fd)
        if self.strategy != "naive":
            for i, fd in enumerate(self.msi):
                objs.append((f"msi{i}", "eventfd"))
                fds.append(fd)
        for i, fd in enumerate(self.devices):
            objs.append((f"device{i}", "vfio-device"))
            fds.append(fd)
        if self.vapic_state is not None:
            objs.append(("vapic-state", "memfd"))
            fds.append(self.vapic_state)
        manifest = handoff.make_manifest(
            objs,
            strategy=self.strategy,
            targets=self.targets,
            nr_vcpus=self.table.nr_vcpus,
            saved=self.saved,
        )
        return manifest, fds

    def release(self) -> None:
        """Close everything this VMM holds (after it handed over); it can import again."""
        if self.vapic is not None:
            self.vapic.close()
            self.vapic = None
        if self.vapic_state is not None:
            os.close(self.vapic_state)
            self.vapic_state = None
        for b in self.bindings:
            b.close()
        for fd in self.msi + self.devices + self.notify:
            os.close(fd)
        if self.table is not None:
            self.table.close()
        self.table, self.bindings, self.msi, self.devices, self.notify = None, [], [], [], []
        self.saved = {}

    def stats(self) -> list[dict[str, int]]:
        """Each binding's counters."""
        return [dataclasses.asdict(b.info().stats) for b in self.bindings]

    # The new side.

    def import_(self, h: handoff.Handoff) -> None:
        m = h.manifest
        self.targets = [(int(v), int(x)) for v, x in m["targets"]]
        n = len(self.targets)
        self.devices = [h.fd(f"device{i}") for i in range(n)]
        if self.strategy == "shared":
            self.table = Table.from_fd(h.fd("table"))
            self.bindings = [Binding(h.fd(f"binding{i}")) for i in range(n)]
            self.msi = [h.fd(f"msi{i}") for i in range(n)]
            self._attach_notify(attach=True)
            self._import_vapic(h)
            return
        self.table = self.dev.create_table(int(m["nr_vcpus"]))
        self._attach_notify(attach=False)
        if self.strategy == "naive":
            for fd in self.devices:
                efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                VfioPciDevice.from_device_fd("", os.dup(fd)).set_irq_eventfds(
                    lib.VFIO_PCI_MSI_IRQ_INDEX, [efd]
                )
                self.msi.append(efd)
        else:
            self.msi = [h.fd(f"msi{i}") for i in range(n)]
        if self.strategy == "cpr":
            for v, vecs in m["saved"].items():
                for vec in vecs:
                    self.table.post(int(v), int(vec))
        if self.strategy == "inject":
            for vcpu, vector in self.targets:
                self.table.post(vcpu, vector)
        for efd, (vcpu, vector) in zip(self.msi, self.targets, strict=True):
            self.bindings.append(self.table.bind(efd, vcpu, vector))
        self._import_vapic(h)

    def _import_vapic(self, h: handoff.Handoff) -> None:
        """Create this VMM's vAPIC and load the old one's state, if both have one."""
        self._create_vapic()
        names = [o["name"] for o in h.manifest["objects"]]
        if self.vapic is not None and "vapic-state" in names:
            fd = h.fd("vapic-state")
            self.vapic.load(os.pread(fd, os.fstat(fd).st_size, 0))


def _handle(vmm: TestVmm, cmd: str, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """Run one command; its reply fields."""
    if cmd == "setup":
        vmm.setup(fds, msg["targets"], int(msg["nr_vcpus"]))
    elif cmd == "deliver":
        return {"deliveries": vmm.deliver()}
    elif cmd == "export_begin":
        vmm.export_begin(int(msg.get("vapic_format", 0)))
    elif cmd == "vapic_regs":
        return {"regs": vmm.vapic_regs()}
    elif cmd == "release":
        vmm.release()
    elif cmd == "stats":
        return {"bindings": vmm.stats()}
    elif cmd == "export_scm":
        manifest, out = vmm.export_objects()
        with socket.socket(fileno=fds[0]) as peer:
            handoff.send(peer, manifest, out)
    elif cmd == "export_session":
        manifest, out = vmm.export_objects()
        handoff.preserve(vmm.dev, msg["name"], manifest, out, msg.get("stop_after"))
    elif cmd == "import_scm":
        with socket.socket(fileno=fds[0]) as peer:
            vmm.import_(handoff.receive(peer))
    elif cmd == "import_session":
        h, session = handoff.retrieve(vmm.dev, msg["name"])
        vmm.import_(h)
        session.finish()
        session.close()
    else:
        raise ValueError(f"unknown command {cmd!r}")
    return {}


def serve(ctl: socket.socket, vmm: TestVmm) -> None:
    """Answer commands on ``ctl`` until ``exit`` or EOF.

    ``export_session`` with ``stop_after`` is fault injection: it preserves
    only that many objects, replies, and waits to be killed.
    """
    while True:
        try:
            msg, fds = recv_msg(ctl)
        except EOFError:
            return
        cmd = msg["cmd"]
        if cmd == "exit":
            send_msg(ctl, {"ok": True})
            return
        try:
            reply = {"ok": True, **_handle(vmm, cmd, msg, fds)}
            reply["nr_fds"] = len(os.listdir("/proc/self/fd"))
        except Exception as e:
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        send_msg(ctl, reply)
        if msg.get("stop_after") is not None:
            ctl.recv(1)
            return


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyctl.vmm", description=__doc__.split("\n")[0])
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--strategy", choices=STRATEGIES, required=True)
    p.add_argument("--vapic", type=int, choices=(1, 2), help="keep vAPIC state on this version")
    args = p.parse_args(argv)
    with socket.socket(fileno=args.control_fd) as ctl:
        serve(ctl, TestVmm(args.strategy, args.vapic))
    return 0


if __name__ == "__main__":
    sys.exit(main())
