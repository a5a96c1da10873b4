"""The jobs test suite inside a utility VM, on cgroup v2 with controllers.

This host is cgroup v1: the v2 backend of ``isobox.jobs`` only meets a real unified
hierarchy *with* controllers in the utility VM, whose stage 2 mounts cgroup2 and enables
cpu, memory, pids, io and cpuset in the root's ``subtree_control``. So this test boots one
(TCG), shares the repository of this very test run read-only over 9p, and runs
``tests/test_jobs.py`` and ``tests/test_jobs_hardening.py`` there with the guest's own
Python (Debian's 3.11), under ``ISOBOX_TEST_STRICT=1``: a capability the suite needs that
the guest lacks fails instead of skipping.

Pytest is not in the utility-VM image: the venv's site-packages are shared read-only too
and put on ``PYTHONPATH`` (pure-Python packages; the interpreters are both 3.11, so the
venv's ``.pyc`` files are used). The guest writes nothing to the shares: pytest's
temporary folders live on an ext4 scratch disk (a real block device, which the io-limit
tests need; tmpfs has no device to throttle), its cache is off. ``libsqlite3`` (which the
image does not carry, and the shared ``conftest.py`` imports in every teardown) comes from
the host in a small read-only control share, with the guest's script.

The guest's output streams back over the agent channel (virtio-serial) as it is written,
into ``guest-pytest.log`` in the test's temporary folder.
"""

from __future__ import annotations

import base64
import os
import re
import select
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from isobox.uvm.scratch import create_scratch
from isobox.uvm.vm import Disk, Share, UtilityVM, VmConfig

REPO = Path(__file__).resolve().parents[1]  # the repository of this test run
SUITE = ("tests/test_jobs.py", "tests/test_jobs_hardening.py")
RUN_TIMEOUT = 2400.0  # seconds for the whole guest run (TCG: the suite takes minutes)

# Runs as the guest's `isobox.cmd` (mounts the control share, then this script).
GUEST_SCRIPT = r"""
for d in /sys/class/virtio-ports/*; do [ "$(cat $d/name)" = agent ] && p=/dev/${d##*/}; done
exec >"$p" 2>&1
set -e
mkdir -p /tmp/repo /tmp/site
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 repo /tmp/repo
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 site /tmp/site
mkdir -p /scratch/pytest
set +e
echo "guest: kernel $(uname -r) cpus $(nproc)" \
     "cgroup2 at $(awk '$3 == "cgroup2" {print $2}' /proc/mounts)" \
     "subtree_control: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
cd /tmp/repo
export PYTHONPATH=/tmp/repo/src:/tmp/site LD_LIBRARY_PATH=/tmp/ctl/lib \
       PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 ISOBOX_TEST_STRICT=1 \
       HOME=/tmp TMPDIR=/scratch/pytest
python3 -c 'from isobox.jobs.cgroup import detect
print("guest: backend v%d" % detect("x").version)'
export ISOBOX_CGROUP_VERSION=2  # the tests on the machine's backend: v2, or they fail
t0=$(cut -d' ' -f1 /proc/uptime)
python3 -m pytest -p no:cacheprovider -q --basetemp=/scratch/pytest/base \
    -o timeout=300 @ARGS@
rc=$?
echo "guest: pytest took $t0 -> $(cut -d' ' -f1 /proc/uptime) s of uptime"
echo "__end $rc"
"""


def _guest_cmdline() -> str:
    boot = ("mkdir -p /tmp/ctl && mount -t 9p -o trans=virtio,version=9p2000.L,ro ctl /tmp/ctl"
            " && sh /tmp/ctl/run.sh")
    return "isobox.cmd=" + base64.b64encode(boot.encode()).decode()


def _site_packages() -> Path:
    """The venv's site-packages that hold pytest and its plugins (pure Python)."""
    import pluggy

    site = Path(pluggy.__file__).resolve().parents[1]
    for pkg in ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "pytest_timeout.py",
                "click"):
        assert (site / pkg).exists(), f"{pkg} is not in {site}"
    return site


def _libsqlite3() -> Path:
    import _sqlite3

    for line in Path("/proc/self/maps").read_text().splitlines():
        if "libsqlite3.so" in line:
            return Path(line.split()[-1])
    raise AssertionError(f"libsqlite3 not mapped ({_sqlite3.__file__})")


def _own_qemus() -> set[int]:
    """Live QEMU processes this test process started."""
    out = set()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            comm = (p / "comm").read_text().strip()
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if comm.startswith("qemu-system") and fields[0] != "Z" and int(fields[1]) == os.getpid():
            out.add(int(p.name))
    return out


@pytest.fixture
def no_qemu_left(isobox_env: Path) -> Iterator[None]:
    before = _own_qemus()
    yield
    left = _own_qemus() - before
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"QEMU processes left running: {left}"


def _stream(vm: UtilityVM, log: Path, timeout: float) -> tuple[int, str]:
    """Read the guest's output until its ``__end <rc>`` line; every chunk goes to ``log``."""
    assert vm.agent is not None
    sock = vm.agent
    buf = b""
    deadline = time.monotonic() + timeout
    with open(log, "wb") as fh:
        while True:
            m = re.search(rb"^__end (\d+)$", buf, re.M)
            if m:
                return int(m.group(1)), buf.decode(errors="replace")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"guest run over {timeout:.0f} s; last output:\n"
                                     + buf[-3000:].decode(errors="replace"))
            if not select.select([sock], [], [], min(left, 5.0))[0]:
                if not vm.running:
                    info = vm.exit_info
                    raise AssertionError(f"VM ended: {info.reason if info else '?'}\n"
                                         + buf[-3000:].decode(errors="replace"))
                continue
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError("agent channel closed; last output:\n"
                                     + buf[-3000:].decode(errors="replace"))
            buf += chunk
            fh.write(chunk)
            fh.flush()


def run_in_guest(tmp_path: Path, pytest_args: str, *, cpus: int = 2,
                 timeout: float = RUN_TIMEOUT) -> tuple[int, str, float]:
    """Boot a utility VM (TCG) and run pytest there on the shared repository.
    Returns (pytest's exit code, the guest's output, seconds from boot to the end)."""
    from isobox.uvm.assets import ensure_assets

    ctl = tmp_path / "ctl"
    (ctl / "lib").mkdir(parents=True)
    shutil.copy2(_libsqlite3(), ctl / "lib" / "libsqlite3.so.0")
    (ctl / "run.sh").write_text(GUEST_SCRIPT.replace("@ARGS@", pytest_args))
    scratch = create_scratch(tmp_path / "scratch.ext4", size=2 << 30)
    cfg = VmConfig(memory_mib=1024, cpus=cpus, cmdline=_guest_cmdline(),
                   disks=[Disk(scratch.path, "scratch", readonly=False)],
                   shares=[Share("repo", REPO, readonly=True),
                           Share("site", _site_packages(), readonly=True),
                           Share("ctl", ctl, readonly=True)])
    t0 = time.monotonic()
    try:
        with UtilityVM(f"jobs{os.getpid()}", ensure_assets(), cfg, accel="tcg") as vm:
            vm.start()
            rc, out = _stream(vm, tmp_path / "guest-pytest.log", timeout)
            vm.wait(60)  # the script returns, stage 2 powers off
    finally:
        scratch.release()
    return rc, out, time.monotonic() - t0


def summary(out: str) -> dict[str, int]:
    """pytest's last summary line, as {'passed': n, 'failed': m, ...}."""
    lines = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    assert lines, f"no pytest summary line in the guest's output:\n{out[-3000:]}"
    return {word.rstrip("s"): int(n) for n, word in re.findall(r"(\d+) (\w+)", lines[-1])}


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.slow
@pytest.mark.timeout(int(RUN_TIMEOUT) + 300)
def test_jobs_suite_passes_on_cgroup_v2_in_a_utility_vm(tmp_path: Path,
                                                         no_qemu_left: Any) -> None:
    # The v1-only tests (v1 file layouts, v1 semantics) are deselected: strict mode would
    # fail them for the missing v1 hierarchies.
    rc, out, took = run_in_guest(tmp_path, "-m 'not cgroup1' " + " ".join(SUITE))
    print(f"guest run: {took:.0f} s")
    assert "guest: backend v2" in out, out[:2000]
    assert "cgroup2 at /sys/fs/cgroup " in out and "memory" in out.split("subtree_control:")[1]
    counts = summary(out)
    assert counts.get("passed", 0) > 0 and counts.get("failed", 0) == 0 \
        and counts.get("error", 0) == 0, f"{counts}\n{out[-6000:]}"
    assert rc == 0, out[-6000:]
