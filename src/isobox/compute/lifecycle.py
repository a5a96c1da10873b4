"""The container lifecycle as an explicit state machine.

A container moves ``creating → created → running ⇄ paused → stopped → (start) running``
and from any state to ``removing`` and then out of the table. ``creating`` is only seen
inside :meth:`ComputeService.create` (a crash there is rolled back at the next open). Every
operation names the states it may run from; an illegal step raises :class:`Conflict` that
names the state, as runc's and containerd's state machines do, so the API answers 409 and
the user learns why (``cannot pause container web: it is stopped``).
"""

from __future__ import annotations

from typing import Final, Literal

from isobox.errors import Conflict

RowState = Literal["creating", "created", "running", "paused", "stopped", "removing"]
ROW_STATES: Final[tuple[RowState, ...]] = (
    "creating", "created", "running", "paused", "stopped", "removing",
)

#: Legal transitions (from → to). Anything else is a bug or a race lost: Conflict.
TRANSITIONS: Final[dict[str, frozenset[str]]] = {
    "creating": frozenset({"created", "removing"}),
    "created": frozenset({"running", "removing"}),
    "running": frozenset({"paused", "stopped", "removing"}),
    "paused": frozenset({"running", "stopped", "removing"}),
    "stopped": frozenset({"running", "removing"}),
    "removing": frozenset(),
}

#: The states each operation may run from.
ALLOWED: Final[dict[str, frozenset[str]]] = {
    "start": frozenset({"created", "stopped"}),
    "kill": frozenset({"running", "paused"}),
    "pause": frozenset({"running"}),
    "resume": frozenset({"paused"}),
    "attach": frozenset({"running", "paused"}),
    "exec": frozenset({"running", "paused"}),
    "top": frozenset({"running", "paused"}),
    "stats": frozenset({"running", "paused"}),
    "remove": frozenset({"created", "stopped"}),
    "remove --force": frozenset({"created", "running", "paused", "stopped"}),
    "archive": frozenset({"created", "running", "paused", "stopped"}),
}

#: States in which a monitor process belongs to the container.
ACTIVE: Final[frozenset[str]] = frozenset({"running", "paused"})


def check(action: str, state: str, who: str) -> None:
    """Raise :class:`Conflict` unless ``action`` may run on a container in ``state``."""
    allowed = ALLOWED.get(action)
    if allowed is None:
        raise ValueError(f"unknown lifecycle action {action!r}")
    if state not in allowed:
        hint = ""
        if action == "remove" and state in ACTIVE:
            hint = "; stop it first or use force"
        raise Conflict(f"cannot {action} container {who}: it is {state}{hint}")


def transition(current: str, new: str, who: str) -> None:
    """Raise :class:`Conflict` unless ``current → new`` is a legal step."""
    if current not in TRANSITIONS:
        raise ValueError(f"unknown state {current!r}")
    if new not in TRANSITIONS[current]:
        raise Conflict(f"container {who}: illegal state change {current} → {new}")
