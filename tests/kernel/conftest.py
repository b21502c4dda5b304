"""Fixtures for the kernel suite: it runs inside the test VM only.

Outside the VM (``KVMLU_IN_VM`` unset) collecting any test here is a usage
error (pytest exits 4), so ``pytest tests/kernel`` on the build machine fails
instead of passing with every test skipped; inside the VM, a missing
/dev/kvmlu is a failure, not a skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pyctl.kvmlu import Device, Table

IN_VM = os.environ.get("KVMLU_IN_VM") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_VM:
        return
    if any("tests/kernel" in str(item.path) for item in items):
        raise pytest.UsageError(
            "the kernel tests run inside the test VM: make test-kernel, or "
            "kvmlu vm -- python -m pytest tests/kernel"
        )


@pytest.fixture
def dev() -> Iterator[Device]:
    with Device() as d:
        yield d


@pytest.fixture
def table(dev: Device) -> Iterator[Table]:
    with dev.create_table(8) as t:
        yield t


@pytest.fixture
def efd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    yield fd
    os.close(fd)
