"""The PIR preservation checker on hand-made timelines."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyctl.check import Fetch, Raise, check, dump_log, load_log
from pyctl.errors import InputError


def F(t: float, vcpu: int, *vectors: int, side: str = "new") -> Fetch:
    return Fetch(t, vcpu, frozenset(vectors), side)


def test_each_raise_delivered_is_ok() -> None:
    r = check([Raise(1, 0, 0x41), Raise(3, 0, 0x41)], [F(2, 0, 0x41), F(4, 0, 0x41)])
    assert r.ok
    assert (r.total("raised"), r.total("delivered")) == (2, 2)


def test_coalesced_raises_need_one_delivery() -> None:
    """Equal vectors coalesce: three raises, one later delivery, nothing lost."""
    r = check([Raise(1, 0, 0x41), Raise(2, 0, 0x41), Raise(3, 0, 0x41)], [F(4, 0, 0x41)])
    assert r.ok


def test_raise_after_last_fetch_is_lost() -> None:
    r = check([Raise(1, 0, 0x41), Raise(5, 0, 0x41)], [F(2, 0, 0x41)])
    assert (r.lost, r.spurious, r.duplicated) == (1, 0, 0)
    assert not r.ok


def test_fetch_missing_a_landed_raise_loses_it() -> None:
    """A later delivery does not excuse a fetch that should have seen the vector."""
    raises = [Raise(1, 0, 0x41), Raise(2, 0, 0x41), Raise(5, 0, 0x41)]
    r = check(raises, [F(3, 0), F(6, 0, 0x41)])
    assert (r.lost, r.spurious, r.duplicated) == (2, 0, 0)


def test_empty_fetch_with_nothing_raised_is_fine() -> None:
    assert check([Raise(2, 0, 0x41)], [F(1, 0), F(3, 0, 0x41), F(4, 0)]).ok


def test_never_raised_vector_is_spurious() -> None:
    r = check([Raise(1, 0, 0x41)], [F(2, 0, 0x41), F(2, 1, 0x42)])
    assert (r.lost, r.spurious, r.duplicated) == (0, 1, 0)
    assert r.keys[(1, 0x42)].spurious == 1


def test_second_delivery_of_one_raise_is_duplicated() -> None:
    """An old owner takes it, the new one re-injects it: duplicated."""
    r = check([Raise(1, 0, 0x41)], [F(2, 0, 0x41, side="old"), F(3, 0, 0x41)])
    assert (r.lost, r.spurious, r.duplicated) == (0, 0, 1)


def test_fetch_starting_before_landing_does_not_cover_it() -> None:
    r = check([Raise(2, 0, 0x41)], [F(1, 0, 0x41)])
    assert (r.lost, r.spurious) == (1, 1)


def test_keys_are_independent() -> None:
    """A delivery on one vCPU does not cover a raise on another, nor another vector."""
    r = check([Raise(1, 0, 0x41), Raise(1, 1, 0x42)], [F(2, 1, 0x41), F(2, 0, 0x42)])
    assert (r.lost, r.spurious) == (2, 2)


def test_switch_window_counts(tmp_path: Path) -> None:
    raises = [Raise(1, 0, 0x41), Raise(5, 0, 0x41), Raise(9, 0, 0x41)]
    fetches = [F(2, 0, 0x41, side="old"), F(10, 0, 0x41)]
    r = check(raises, fetches, switch=(4, 6))
    assert r.ok
    assert r.keys[(0, 0x41)].raised_in_switch == 1
    assert "OK: 0 lost, 0 spurious, 0 duplicated" in r.text()
    log = tmp_path / "log.json"
    dump_log(str(log), raises, fetches, (4, 6))
    assert load_log(str(log)) == (raises, fetches, (4.0, 6.0))


def test_kvmlu_check_cli(tmp_path: Path) -> None:
    """kvmlu check exits 0 on a clean log and 1 on one with a loss."""
    import json
    import subprocess
    import sys

    good = tmp_path / "good.json"
    bad = tmp_path / "bad.json"
    good.write_text(json.dumps({"raises": [[1, 0, 65]], "fetches": [[2, 0, [65], "new"]]}))
    bad.write_text(json.dumps({"raises": [[1, 0, 65]], "fetches": [[1.5, 0, [], "new"]]}))
    kvmlu = [sys.executable, "-m", "pyctl.cli", "check"]
    r = subprocess.run([*kvmlu, str(good)], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*kvmlu, str(bad)], capture_output=True, text=True, check=False)
    assert r.returncode == 1 and "1 lost" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*kvmlu, "--json", str(bad)], capture_output=True, text=True, check=False)
    assert json.loads(r.stdout)["lost"] == 1


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("", "empty"),
        ("{", "not a kvmlu log"),
        ("[]", "not an object"),
        ('{"raises": []}', "no fetches"),
        ('{"raises": [], "fetches": []}', "no raises: nothing to check"),
        ('{"raises": [[1, 0]], "fetches": []}', "malformed entry"),
        ('{"raises": [[1, 0, 65]], "fetches": [[2, 0, 65, "new"]]}', "malformed entry"),
    ],
)
def test_a_log_that_is_not_one_is_an_input_error(tmp_path: Path, text: str, said: str) -> None:
    """An empty, broken or raise-less log is refused, never checked as OK."""
    log = tmp_path / "log.json"
    log.write_text(text)
    with pytest.raises(InputError, match=said):
        load_log(str(log))


def test_kvmlu_check_of_an_empty_log_exits_3(tmp_path: Path) -> None:
    import subprocess
    import sys

    log = tmp_path / "empty.json"
    log.write_text("")
    r = subprocess.run([sys.executable, "-m", "pyctl.cli", "check", str(log)],
                       capture_output=True, text=True, check=False)  # fmt: skip
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "empty" in r.stderr, r.stderr


def Fi(t: float, end: float, vcpu: int, *vectors: int) -> Fetch:
    return Fetch(t, vcpu, frozenset(vectors), "new", end)


def test_fetch_may_take_a_raise_that_is_still_landing() -> None:
    # Issued at 1, landed (stamped) at 3; the fetch of 2..2.5 took it: no spurious.
    r = check([Raise(3, 0, 0x41, issued=1)], [Fi(2, 2.5, 0, 0x41), Fi(4, 4.1, 0)])
    assert r.ok and r.keys[(0, 0x41)].delivered == 1


def test_fetch_that_returned_before_the_issue_is_spurious() -> None:
    r = check([Raise(3, 0, 0x41, issued=2)], [Fi(0.5, 1, 0, 0x41), Fi(4, 4.1, 0, 0x41)])
    assert r.spurious == 1 and r.lost == 0


def test_fetch_that_started_before_the_landing_need_not_see_it() -> None:
    r = check([Raise(2, 0, 0x41, issued=1)], [Fi(1.5, 2.5, 0), Fi(3, 3.1, 0, 0x41)])
    assert r.ok


def test_fetch_that_started_after_the_landing_must_see_it() -> None:
    r = check([Raise(2, 0, 0x41, issued=1)], [Fi(2.2, 2.5, 0), Fi(3, 3.1, 0)])
    assert r.lost == 1


def test_one_fetch_covers_a_landed_and_an_inflight_raise() -> None:
    raises = [Raise(1, 0, 0x41, issued=0.5), Raise(3, 0, 0x41, issued=1.5)]
    r = check(raises, [Fi(2, 2.2, 0, 0x41), Fi(4, 4.1, 0)])
    assert r.ok and r.keys[(0, 0x41)].raised == 2


def test_fetch_during_an_issue_need_not_have_taken_it() -> None:
    # R1 landed at 1; R2 issued at 1.5, landed at 3. The fetch of 2..2.2 took
    # R1 (R2 was not posted yet); the fetch at 4 takes R2: neither is a duplicate.
    raises = [Raise(1, 0, 0x41, issued=0.5), Raise(3, 0, 0x41, issued=1.5)]
    r = check(raises, [Fi(2, 2.2, 0, 0x41), Fi(4, 4.1, 0, 0x41), Fi(5, 5.1, 0)])
    assert r.ok and r.keys[(0, 0x41)].delivered == 2
    # A third delivery has no raise behind it.
    r = check(raises, [Fi(2, 2.2, 0, 0x41), Fi(4, 4.1, 0, 0x41), Fi(5, 5.1, 0, 0x41)])
    assert r.duplicated == 1


def test_raise_that_landed_during_a_fetch_may_come_in_the_next() -> None:
    # The fetch of 1..5 returned 0x41 for the raise landed at 0.5; the one
    # landed at 3 (during that fetch) may be in it or in the next fetch.
    raises = [Raise(0.5, 0, 0x41, issued=0.2), Raise(3, 0, 0x41, issued=2)]
    assert check(raises, [Fi(1, 5, 0, 0x41), Fi(6, 6.1, 0, 0x41), Fi(7, 7.1, 0)]).ok
    assert check(raises, [Fi(1, 5, 0, 0x41), Fi(6, 6.1, 0)]).ok
    # But a raise that landed before the fetch started is in it, and only once.
    early = [Raise(0.5, 0, 0x41, issued=0.2)]
    assert check(early, [Fi(1, 5, 0, 0x41), Fi(6, 6.1, 0, 0x41)]).duplicated == 1


def test_raise_in_flight_across_two_deliveries_justifies_one() -> None:
    # R1 landed at 1; R2 issued at 2, landed at 9. Fetch 1.5..3 took R1 (and
    # maybe R2), fetch 4..5 took R2: fine. A third delivery before R2 landed
    # has nothing behind it.
    raises = [Raise(1, 0, 0x41, issued=0.5), Raise(9, 0, 0x41, issued=2)]
    two = [Fi(1.5, 3, 0, 0x41), Fi(4, 5, 0, 0x41), Fi(10, 10.1, 0)]
    assert check(raises, two).ok
    three = [Fi(1.5, 3, 0, 0x41), Fi(4, 5, 0, 0x41), Fi(6, 7, 0, 0x41), Fi(10, 10.1, 0)]
    assert check(raises, three).duplicated == 1
