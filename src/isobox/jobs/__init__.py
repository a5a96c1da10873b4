"""Jobs: resource control and accounting modelled on Windows Job objects (cgroup v1 and v2).

See :mod:`isobox.jobs.job` for the behaviour and :mod:`isobox.jobs.limits` for the units.

The names below are loaded on first use: the container runtime imports only
:mod:`isobox.jobs.cgroup`, and must not pay for the monitor's threads and sockets.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from isobox.jobs.job import Job
    from isobox.jobs.limits import Accounting, IoLimit, JobEvent, Limits

__all__ = ["Accounting", "IoLimit", "Job", "JobEvent", "Limits"]
_WHERE = {"Job": "isobox.jobs.job", "Accounting": "isobox.jobs.limits",
          "IoLimit": "isobox.jobs.limits", "JobEvent": "isobox.jobs.limits",
          "Limits": "isobox.jobs.limits"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'isobox.jobs' has no attribute {name!r}")
