"""What the jobs tests share: run on whichever cgroup backend the machine has, and read a
job's cgroup files in either spelling.

Most jobs tests are about a Job, not about a cgroup version: they run on v1 where its
hierarchies are writable (this host), else on cgroup v2 *with* the cpu, memory and pids
controllers (a utility VM; see tests/test_jobs_in_vm.py). ``ISOBOX_CGROUP_VERSION`` forces
one. Tests about one version's own layout keep the ``cgroup1`` / ``cgroup2`` markers.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

from conftest import STRICT, probe_cgroup1, probe_cgroup2
from isobox.jobs import Job
from isobox.jobs.cgroup import CgroupV1, CgroupV2


def machine_backend(monkeypatch: pytest.MonkeyPatch) -> int:
    """Pin the jobs of the test to the machine's backend (1 or 2) and return it; skip (fail
    when strict) when neither a writable v1 nor a v2 with controllers is there."""
    forced = os.environ.get("ISOBOX_CGROUP_VERSION", "")
    probes = {1: probe_cgroup1, 2: probe_cgroup2}
    order = [int(forced)] if forced in ("1", "2") else [1, 2]
    why = []
    for version in order:
        ok, reason = probes[version]()
        if ok:
            monkeypatch.setenv("ISOBOX_CGROUP_VERSION", str(version))
            return version
        why.append(f"v{version}: {reason}")
    msg = f"capability 'cgroup v1 or v2 with controllers' missing: {'; '.join(why)}"
    if STRICT:
        pytest.fail(f"{msg} (strict mode)", pytrace=False)
    pytest.skip(msg)


def cg_file(job: Job, v1: tuple[str, str], v2: str) -> Path:
    """A file of ``job``'s cgroup: ``v1`` = (controller, name) in that hierarchy's folder,
    ``v2`` = its name in the unified folder."""
    cg = job.cgroup
    if isinstance(cg, CgroupV1):
        return cg.paths[v1[0]] / v1[1]
    assert isinstance(cg, CgroupV2)
    return cg.path / v2


def memory_limit(job: Job) -> int:
    text = cg_file(job, ("memory", "memory.limit_in_bytes"), "memory.max").read_text()
    return int(text)


def memory_usage(job: Job) -> int:
    return int(cg_file(job, ("memory", "memory.usage_in_bytes"), "memory.current").read_text())


def cfs_quota_period(job: Job) -> tuple[int, int]:
    """The CPU quota and period written for ``job`` (microseconds)."""
    cg = job.cgroup
    if isinstance(cg, CgroupV1):
        return (int((cg.paths["cpu"] / "cpu.cfs_quota_us").read_text()),
                int((cg.paths["cpu"] / "cpu.cfs_period_us").read_text()))
    assert isinstance(cg, CgroupV2)
    quota, period = (cg.path / "cpu.max").read_text().split()
    return int(quota), int(period)


def hierarchy_dirs(rel: str) -> list[str]:
    """``rel`` below the mount of every hierarchy: v1's ``/sys/fs/cgroup/<ctrl>/rel`` and
    v2's ``/sys/fs/cgroup/rel``, whichever exist."""
    found = glob.glob(f"/sys/fs/cgroup/*/{rel}")
    v2 = f"/sys/fs/cgroup/{rel}"
    if os.path.isdir(v2) and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        found.append(v2)
    return sorted(found)


def in_job(cgroup_lines: list[str], job: Job) -> tuple[list[str], list[str]]:
    """Split a ``/proc/PID/cgroup`` into the lines of the job's hierarchies that name the
    job and those that do not (v1: the controllers a job uses; v2: the unified line)."""
    from isobox.jobs.cgroup import V1_CONTROLLERS

    ours = [ln for ln in cgroup_lines
            if (ln.split(":")[1] == "" if job.cgroup.version == 2
                else ln.split(":")[1] in V1_CONTROLLERS)]
    return ([ln for ln in ours if job.name in ln], [ln for ln in ours if job.name not in ln])
