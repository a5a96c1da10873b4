"""The container state machine: legal steps pass, every illegal one is a Conflict that
names the state."""

from __future__ import annotations

import itertools

import pytest

from isobox.compute import lifecycle
from isobox.errors import Conflict, IsoboxError


def test_every_state_has_its_transitions() -> None:
    assert set(lifecycle.TRANSITIONS) == set(lifecycle.ROW_STATES)
    for targets in lifecycle.TRANSITIONS.values():
        assert targets <= set(lifecycle.ROW_STATES)


def test_documented_cycle_is_legal() -> None:
    path = ["creating", "created", "running", "paused", "running", "stopped", "running",
            "stopped", "removing"]
    for a, b in itertools.pairwise(path):
        lifecycle.transition(a, b, "c1")


@pytest.mark.parametrize("state", [s for s in lifecycle.ROW_STATES if s != "removing"])
def test_any_state_may_go_to_removing(state: str) -> None:
    lifecycle.transition(state, "removing", "c1")


@pytest.mark.parametrize(("a", "b"), [
    ("created", "paused"), ("created", "stopped"), ("stopped", "paused"),
    ("removing", "created"), ("removing", "running"), ("running", "created"),
    ("stopped", "created"), ("paused", "created"), ("creating", "running"),
])
def test_illegal_transitions_are_conflicts(a: str, b: str) -> None:
    with pytest.raises(Conflict, match=f"{a} → {b}"):
        lifecycle.transition(a, b, "web")


@pytest.mark.parametrize(("action", "ok", "bad"), [
    ("start", ["created", "stopped"], ["running", "paused", "removing", "creating"]),
    ("pause", ["running"], ["created", "paused", "stopped"]),
    ("resume", ["paused"], ["created", "running", "stopped"]),
    ("kill", ["running", "paused"], ["created", "stopped"]),
    ("exec", ["running", "paused"], ["created", "stopped"]),
    ("remove", ["created", "stopped"], ["running", "paused"]),
])
def test_actions_check_the_state(action: str, ok: list[str], bad: list[str]) -> None:
    for s in ok:
        lifecycle.check(action, s, "web")
    for s in bad:
        with pytest.raises(Conflict) as info:
            lifecycle.check(action, s, "web")
        assert f"cannot {action} container web: it is {s}" in str(info.value)
        assert info.value.http_status == 409


def test_remove_of_a_running_container_suggests_force() -> None:
    with pytest.raises(Conflict, match="force"):
        lifecycle.check("remove", "running", "web")


def test_unknown_action_is_a_bug_not_a_conflict() -> None:
    with pytest.raises(ValueError):
        lifecycle.check("teleport", "running", "web")


def test_error_classes_are_in_the_tree() -> None:
    from isobox import errors

    assert issubclass(errors.WaitTimeout, IsoboxError)
    assert errors.WaitTimeout.http_status == 408
    assert errors.IsolationUnavailable.http_status == 400
