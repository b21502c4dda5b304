"""Posting and fetching concurrently: nothing lost, nothing invented, nothing twice."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable

from kutil import eventfd_count

from pyctl.kvmlu import Device, PostResult

POSTERS = 3
NR_VCPUS = 2
SECONDS = 2.0  # at least this long,
MIN_RISES = 1000  # and until this many PIR rises happened;
HANG_SECONDS = 600.0  # a guard only (a debug kernel posts about 175 a second)


def race(
    threads: list[threading.Thread],
    stop: threading.Event,
    errors: list[BaseException],
    enough: Callable[[], bool],
) -> None:
    """Run ``threads`` for SECONDS and until ``enough()``; then stop and join them.

    HANG_SECONDS only stops a race that makes no progress; the caller checks
    ``enough()`` again. What a thread raises is in ``errors``.
    """
    for th in threads:
        th.start()
    start = time.monotonic()
    while time.monotonic() - start < SECONDS or not enough():
        if errors or time.monotonic() - start > HANG_SECONDS:
            break
        threads[0].join(timeout=0.05)
    stop.set()
    for th in threads:
        th.join()
    assert not errors, errors


def test_concurrent_post_and_fetch(dev: Device) -> None:
    """Posters race a fetcher; fetched + left == posted, each rise taken once.

    The race runs for SECONDS and until MIN_RISES rises, so that a slow
    (debug, or loaded) kernel races as much as a fast one: the posters run
    until they are told to stop, not for a fixed number of posts, and
    nothing is asserted about how fast the rises come. HANG_SECONDS only
    stops a race that makes no progress."""
    efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(NR_VCPUS)]
    posted: list[set[tuple[int, int]]] = [set() for _ in range(POSTERS)]
    # PIR 0->1 per vCPU; every key there from the start, so that counting
    # them while the posters run never sees a dict change size.
    rises: list[Counter[int]] = [Counter(dict.fromkeys(range(NR_VCPUS), 0)) for _ in range(POSTERS)]
    notified: list[Counter[int]] = [Counter() for _ in range(POSTERS)]
    taken: Counter[tuple[int, int]] = Counter()
    stop = threading.Event()
    errors: list[BaseException] = []

    with dev.create_table(NR_VCPUS) as t:
        for v, fd in enumerate(efds):
            t.set_notify(v, fd, nv=0xF0 + v, ndst=v)

        def poster(i: int) -> None:
            rng = random.Random(i)
            try:
                while not stop.is_set():
                    v, vec = rng.randrange(NR_VCPUS), rng.randrange(32, 256)
                    r = t.post(v, vec)
                    posted[i].add((v, vec))
                    if not r & PostResult.COALESCED:
                        rises[i][v] += 1
                    if r & PostResult.NOTIFIED:
                        notified[i][v] += 1
            except BaseException as e:  # surfaced below
                errors.append(e)

        def fetcher() -> None:
            try:
                while not stop.is_set():
                    for v in range(NR_VCPUS):
                        for vec in t.fetch(v):
                            taken[(v, vec)] += 1
            except BaseException as e:
                errors.append(e)

        def n_rises() -> int:
            return sum(sum(c.values()) for c in rises)

        threads = [threading.Thread(target=poster, args=(i,)) for i in range(POSTERS)]
        threads.append(threading.Thread(target=fetcher))
        race(threads, stop, errors, lambda: n_rises() > MIN_RISES)
        assert n_rises() > MIN_RISES, f"no progress: {n_rises()} rises in {HANG_SECONDS:g} s"

        for v in range(NR_VCPUS):
            for vec in t.fetch(v):
                taken[(v, vec)] += 1
            d = t.view(v)
            assert not d.pir and not d.on, f"vCPU {v} left {d}"

    all_posted = set().union(*posted)
    assert set(taken) == all_posted, (
        f"lost {sorted(all_posted - set(taken))[:10]} "
        f"invented {sorted(set(taken) - all_posted)[:10]}"
    )
    for v in range(NR_VCPUS):
        n_rises = sum(c[v] for c in rises)
        n_taken = sum(n for (tv, _), n in taken.items() if tv == v)
        assert n_taken == n_rises, f"vCPU {v}: {n_rises} PIR rises but {n_taken} taken"
        n_notified = sum(c[v] for c in notified)
        assert eventfd_count(efds[v]) == n_notified, f"vCPU {v}: signals != ON rises"
    for fd in efds:
        os.close(fd)


TARGETS = 4  # eventfds a switcher cycles the notification target through
MIN_SWITCHES = 200


def test_target_replaced_while_posting(dev: Device) -> None:
    """SET_NOTIFY replaces a vCPU's target while posters and a fetcher race.

    Posts find the target without a lock; every ON rise must still signal
    exactly one of the targets once: the signals counted over all of them
    equal the NOTIFIED results, however the replacements fell.
    """
    efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(TARGETS)]
    notified = [0] * POSTERS
    switches = 0
    stop = threading.Event()
    errors: list[BaseException] = []

    with dev.create_table(1) as t:
        t.set_notify(0, efds[0], nv=0xF0, ndst=0)

        def poster(i: int) -> None:
            rng = random.Random(i)
            try:
                while not stop.is_set():
                    if t.post(0, rng.randrange(32, 256)) & PostResult.NOTIFIED:
                        notified[i] += 1
            except BaseException as e:  # surfaced below
                errors.append(e)

        def fetcher() -> None:
            try:
                while not stop.is_set():
                    t.fetch(0)
            except BaseException as e:
                errors.append(e)

        def switcher() -> None:
            nonlocal switches
            try:
                while not stop.is_set():
                    switches += 1
                    t.set_notify(0, efds[switches % TARGETS], nv=0xF0, ndst=0)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=poster, args=(i,)) for i in range(POSTERS)]
        threads += [threading.Thread(target=fetcher), threading.Thread(target=switcher)]
        race(threads, stop, errors, lambda: sum(notified) > MIN_RISES and switches > MIN_SWITCHES)
        assert sum(notified) > MIN_RISES and switches > MIN_SWITCHES, (
            f"no progress: {sum(notified)} ON rises, {switches} switches in {HANG_SECONDS:g} s"
        )
        # A POST signals before it returns (even a target replaced meanwhile,
        # which is put only after a grace period), and the posters are joined.
        t.set_notify(0, None, nv=0xF0, ndst=0)
    signals = sum(eventfd_count(fd) for fd in efds)
    for fd in efds:
        os.close(fd)
    assert signals == sum(notified), f"{signals} signals for {sum(notified)} ON rises"
