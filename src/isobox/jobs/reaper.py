"""The clean-up guard of a top-level job: ``python -m isobox.jobs.reaper DESC``.

Started by :class:`isobox.jobs.Job` with every top-level job, in a session of its own,
outside the job. It blocks reading its stdin, a pipe whose other end only the job's owner
holds. When that pipe closes — the owner closed the job, exited, or was killed with SIGKILL —
it kills every process left in the job (kill-on-close; frozen nested jobs are thawed after
the kill so their processes die too), or without kill-on-close waits for the job to empty,
then removes the job's cgroups deepest first and their parents when they are empty, so
nothing is left in the cgroup filesystem.

It does not give up: while anything is left it tries again, backing off to one attempt every
5 seconds (a process in uninterruptible sleep dies when its system call ends).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from isobox.errors import IsoboxError
from isobox.jobs.cgroup import Cgroup, from_description

WAIT_EMPTY = 0.5  # without kill-on-close: how often to look whether the job has emptied
MAX_BACKOFF = 5.0


def _wait_for_close() -> None:
    while True:
        try:
            if not os.read(0, 4096):
                return
        except InterruptedError:
            continue
        except OSError:
            return


def clean_up(cg: Cgroup, *, kill: bool) -> None:
    """Kill (or wait for) what is left in ``cg``, then remove it and its empty parents;
    retry until that is done."""
    delay = 0.05
    while cg.exists():
        if kill:
            with contextlib.suppress(IsoboxError, OSError):
                cg.kill_all()
        elif cg.pids():
            time.sleep(WAIT_EMPTY)
            continue
        with contextlib.suppress(IsoboxError, OSError):
            cg.remove()
        if cg.exists():
            time.sleep(delay)
            delay = min(MAX_BACKOFF, delay * 2)
    with contextlib.suppress(IsoboxError, OSError):
        cg.remove_parents()


def main(argv: list[str]) -> int:
    desc = json.loads(argv[1])
    cg = from_description(desc["cgroup"])
    _wait_for_close()
    clean_up(cg, kill=bool(desc.get("kill", True)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
