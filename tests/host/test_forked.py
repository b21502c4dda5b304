"""pyctl.forked: a function run in a forked child reports back, or its error does."""

from __future__ import annotations

import os

import pytest

from pyctl.forked import ChildError, in_child


def test_the_child_reports_its_value_and_runs_become_first() -> None:
    parent = os.getpid()
    seen: list[int] = []

    def become() -> None:
        seen.append(os.getpid())

    def fn() -> dict[str, object]:
        return {"pid": os.getpid(), "became": seen}

    out = in_child(become, fn)
    assert out["pid"] != parent
    assert out["became"] == [out["pid"]], "become() ran in the child, before fn()"
    assert seen == [], "nothing ran in the parent"


def test_what_the_child_raises_comes_back_as_child_error() -> None:
    def fn() -> None:
        raise PermissionError(1, "not allowed")

    with pytest.raises(ChildError, match="PermissionError"):
        in_child(lambda: None, fn)


def test_a_value_that_is_not_json_is_an_error() -> None:
    with pytest.raises(ChildError, match="not JSON serializable"):
        in_child(lambda: None, object)
