"""SET_SN racing real posts: ON is never set under SN, and clearing SN re-arms.

VT-d decides SN and ON in one step: once software has set SN, the IOMMU
sets no ON and sends no notification for that descriptor until SN is
cleared. kvmlu must do the same (issue 17, item 4).

What userspace can observe, and what this test checks after every step of a
fixed number of rounds, with POSTERS threads posting throughout except
while the toggler holds them at the gate:

- After SET_SN(1) and a FETCH (which clears ON), ON stays clear until SN is
  cleared: no post may set it. ON=1 with SN=1 seen then is the forbidden
  state, and only a post could have produced it.
- No notification arrives from the SET_SN(1) of a round to the point where
  the posters are held again: ON was already set when SN was set (every
  round ends with it set), the FETCH cleared it under SN, so no ON rose and
  nothing may be signalled.
- Liveness: SN cleared while PIR holds vectors leaves ON set, and exactly
  one notification arrives for it, whether the clear or a racing post took
  ON from 0 to 1; SN cleared with PIR empty leaves ON clear and signals
  nothing.

The posters are held only at the gate between posts: each round has parts
where SET_SN and FETCH race the posts and quiet points where the
descriptor and the eventfd are counted exactly.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial

import pytest
from kutil import eventfd_count

from pyctl.kvmlu import Descriptor, Device, PostResult, Table

POSTERS = 3
ROUNDS = 300
POSTS_PER_PHASE = 8  # posts each raced phase waits for
VCPU = 1
HANG_SECONDS = 300.0  # a guard only: one wait that makes no progress


class Gate:
    """Lets posters through one post at a time and counts their posts; the
    toggler closes it to hold every poster between two posts."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.open = True
        self.stop = False
        self.busy = 0
        self.posts = 0
        self.errors: list[BaseException] = []

    def enter(self) -> bool:
        """Wait until open; False when the race is over."""
        with self.cv:
            while not self.open and not self.stop:
                self.cv.wait()
            if self.stop:
                return False
            self.busy += 1
            return True

    def leave(self) -> None:
        with self.cv:
            self.busy -= 1
            self.posts += 1
            self.cv.notify_all()

    def fail(self, e: BaseException) -> None:
        with self.cv:
            self.errors.append(e)
            self.stop = True
            self.cv.notify_all()

    def close(self) -> None:
        """Hold every poster between two posts."""
        with self.cv:
            self.open = False
            if not self.cv.wait_for(lambda: self.busy == 0, HANG_SECONDS):
                raise AssertionError(f"posters not at the gate after {HANG_SECONDS:g} s")

    def reopen(self) -> None:
        with self.cv:
            self.open = True
            self.cv.notify_all()

    def wait_posts(self, n: int, check: Callable[[], object]) -> None:
        """Wait until ``n`` more posts returned, calling ``check`` before the
        wait and after each wakeup (each post that returns wakes it)."""
        deadline = time.monotonic() + HANG_SECONDS
        with self.cv:
            target = self.posts + n
        while True:
            check()
            with self.cv:
                if self.errors:
                    raise AssertionError(f"a poster failed: {self.errors!r}")
                if self.posts >= target:
                    return
                self.cv.wait(0.01)
            if time.monotonic() > deadline:
                raise AssertionError(f"no progress in {HANG_SECONDS:g} s: posts")

    def finish(self) -> None:
        with self.cv:
            self.stop = True
            self.cv.notify_all()


@pytest.fixture
def notify_fd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    yield fd
    os.close(fd)


def _poster(t: Table, gate: Gate, seed: int) -> None:
    rng = random.Random(seed)
    try:
        while gate.enter():
            try:
                t.post(VCPU, rng.randrange(32, 256))
            finally:
                gate.leave()
    except BaseException as e:  # surfaced by the toggler
        gate.fail(e)


def _suppressed(t: Table, rnd: int, when: str) -> Descriptor:
    d = t.view(VCPU)
    assert d.sn, f"round {rnd} {when}: SN lost: {d}"
    assert not d.on, f"round {rnd} {when}: ON set while SN is set after FETCH: {d}"
    return d


def test_set_sn_races_posts(dev: Device, notify_fd: int) -> None:
    """ROUNDS rounds of SET_SN(1), FETCH, posts under SN, SET_SN(0), each
    racing POSTERS posting threads; the invariants of the module docstring
    hold at every step, and the counters agree at the end."""
    gate = Gate()
    own_posts = 1
    with dev.create_table(2) as t:
        t.set_notify(VCPU, notify_fd, nv=0xF2, ndst=VCPU)
        # The quiet state every round starts from: ON set, eventfd drained.
        assert t.post(VCPU, 0x20) == PostResult.NOTIFIED
        assert eventfd_count(notify_fd) == 1
        threads = [
            threading.Thread(target=_poster, args=(t, gate, i), daemon=True) for i in range(POSTERS)
        ]
        for th in threads:
            th.start()
        try:
            for rnd in range(ROUNDS):
                # Raced: SN is set while posts run. ON is as it was (set).
                t.set_sn(VCPU, True)
                t.fetch(VCPU)
                # From here on no post may set ON until SN is cleared.
                gate.wait_posts(POSTS_PER_PHASE, partial(_suppressed, t, rnd, "under SN"))
                gate.close()
                d = _suppressed(t, rnd, "held")
                assert d.pir, f"round {rnd}: posts under SN left no PIR bit: {d}"
                n = eventfd_count(notify_fd)
                assert n == 0, f"round {rnd}: {n} notifications after SET_SN(1) returned"
                gate.reopen()
                gate.wait_posts(POSTS_PER_PHASE, partial(_suppressed, t, rnd, "posting"))
                # Raced: SN is cleared while posts run. On odd rounds PIR is
                # taken first, so the clear may find it empty while a post
                # that still sees SN set lands: one of them must set ON.
                if rnd % 2:
                    t.fetch(VCPU)
                t.set_sn(VCPU, False)
                gate.close()
                d = t.view(VCPU)
                assert not d.sn, f"round {rnd}: SN still set: {d}"
                if not rnd % 2:
                    assert d.pir, f"round {rnd}: vectors posted under SN are gone: {d}"
                assert d.on == bool(d.pir), f"round {rnd}: SN clear, PIR and ON disagree: {d}"
                n = eventfd_count(notify_fd)
                assert n == int(d.on), f"round {rnd}: {n} notifications, ON={d.on:d}"
                if not d.on:
                    # Back to the quiet state: ON set, eventfd drained.
                    assert t.post(VCPU, 0x20) == PostResult.NOTIFIED
                    assert eventfd_count(notify_fd) == 1
                    own_posts += 1
                gate.reopen()
        finally:
            gate.finish()
            for th in threads:
                th.join()
        assert not gate.errors, gate.errors
        s = t.info().stats
        # The setup post, then one rise per round (by the clear, a post, or
        # the toggler's own post).
        assert s.notified == ROUNDS + 1, f"{s.notified} ON rises in {ROUNDS} rounds"
        assert s.signals == gate.posts + own_posts
