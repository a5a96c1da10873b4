"""The kill-on-close guard of a top-level job: ``python -m isobox.jobs.reaper DESC``.

Started by :class:`isobox.jobs.Job` in a session of its own, outside the job. It blocks
reading its stdin, a pipe whose other end only the job's owner holds. When that pipe closes
— the owner closed the job, exited, or was killed with SIGKILL — it kills every process left
in the job (kill-on-close) and removes the job's cgroups, deepest first, so nothing is left
in the cgroup filesystem. Without kill-on-close it waits for the job to empty first.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from isobox.errors import IsoboxError
from isobox.jobs.cgroup import Cgroup, from_description


def _wait_for_close() -> None:
    while True:
        try:
            if not os.read(0, 4096):
                return
        except InterruptedError:
            continue
        except OSError:
            return


def _remove_tree(cg: Cgroup) -> None:
    for top in cg.dirs():
        if not os.path.isdir(top):
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
            for _ in range(500):
                try:
                    os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def main(argv: list[str]) -> int:
    desc = json.loads(argv[1])
    cg = from_description(desc["cgroup"])
    _wait_for_close()
    if not cg.exists():
        return 0
    if desc.get("kill", True):
        with contextlib.suppress(IsoboxError, OSError):
            cg.kill_all()
    else:
        while cg.exists() and cg.pids():
            time.sleep(1.0)
    _remove_tree(cg)
    return 0 if not any(Path(d).exists() for d in cg.dirs()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
