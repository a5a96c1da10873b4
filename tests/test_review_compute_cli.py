"""Review of issue 5: ``isobox`` verbs that behave unlike docker's, or leave things behind.

Each test runs the CLI as a user does (a subprocess) against a real isoboxd on the test's
root (tests/daemonkit.py) and checks at the end that nothing of any container is left.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.overlay, pytest.mark.cgroup1]


def isobox(*args: str, check: bool = True, input: str | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "isobox.cli.main", *args], input=input,
        capture_output=True, text=True, check=False, env=os.environ.copy(), timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def busybox(isobox_env: Path) -> Iterator[Path]:
    """A real isoboxd with busybox (autostart off); every container removed at the end and
    nothing of any container may be left."""
    from daemonkit import Daemon, assert_nothing_left

    run = Path(os.environ["ISOBOX_RUN"])
    os.environ["ISOBOX_AUTOSTART"] = "0"
    d = Daemon.start(isobox_env, run)
    ids: list[str] = []
    try:
        isobox("image", "bootstrap", "busybox")
        yield isobox_env
    finally:
        try:
            ids = isobox("ps", "-aq", "--no-trunc", check=False).stdout.split()
            if ids:
                isobox("rm", "-f", *ids, check=False)
        finally:
            d.stop()
            del os.environ["ISOBOX_AUTOSTART"]
    assert_nothing_left(isobox_env, run, ids)


def test_review_run_rm_removes_a_container_whose_start_failed(busybox: Path,
                                                              tmp_path: Path) -> None:
    """``run --rm`` whose start fails *after* the 101 (the error comes as an error frame:
    a missing bind source, a host-isolated command that is not found) exits 125 and leaves
    the container in ``Created``: cli/containers._start_attached removes it only when
    ``start_attached`` itself raises, not when ``pump`` does."""
    missing = tmp_path / "no-such-folder"
    proc = isobox("run", "--rm", "-v", f"{missing}:/x", "busybox", "true", check=False)
    assert proc.returncode == 125, proc.stderr
    proc = isobox("run", "--rm", "--isolation", "host", "busybox", "no-such-command",
                  check=False)
    assert proc.returncode != 0, proc.stderr
    left = isobox("ps", "-a").stdout
    assert isobox("ps", "-aq").stdout == "", f"--rm left containers behind:\n{left}"


def test_review_run_exit_codes_126_127_with_host_isolation(busybox: Path) -> None:
    """Docker's contract (and the process isolation's here): 127 when the command is not
    found, 126 when it cannot be executed. Host isolation answers 125 for both (the monitor
    refuses the start: ``executable 'no-such-command' not found``), as if isobox itself had
    failed."""
    proc = isobox("run", "--rm", "busybox", "no-such-command", check=False)
    assert proc.returncode == 127, proc.stderr  # process isolation: right
    proc = isobox("run", "--rm", "--isolation", "host", "busybox", "no-such-command",
                  check=False)
    assert proc.returncode == 127, f"exit {proc.returncode}: {proc.stderr}"
    proc = isobox("run", "--rm", "--isolation", "host", "busybox", "/etc/passwd", check=False)
    assert proc.returncode == 126, f"exit {proc.returncode}: {proc.stderr}"


def test_review_host_isolation_does_not_ignore_volumes_and_read_only(busybox: Path,
                                                                     tmp_path: Path) -> None:
    """``-v`` and ``--read-only`` are silently dropped under ``--isolation host``
    (plan._host_process has no mounts; the overlay is mounted writable): the bind is
    nowhere and the image's files are writable. Either honour them (the bind below the
    sandbox mount point, as HostProcess containers do; a read-only root) or refuse the
    document, never run without them."""
    src = tmp_path / "data"
    src.mkdir()
    (src / "hello.txt").write_text("hi\n")
    proc = isobox("run", "--rm", "--isolation", "host", "-v", f"{src}:/data", "busybox",
                  "sh", "-c", 'cat "$ISOBOX_SANDBOX_MOUNT_POINT/data/hello.txt"', check=False)
    refused = proc.returncode == 125 and "mount" in proc.stderr.lower()
    assert refused or (proc.returncode, proc.stdout) == (0, "hi\n"), (
        f"exit {proc.returncode}, stdout {proc.stdout!r}, stderr {proc.stderr!r}")
    proc = isobox("run", "--rm", "--isolation", "host", "--read-only", "busybox", "sh", "-c",
                  'touch "$ISOBOX_SANDBOX_MOUNT_POINT/written" && echo WROTE', check=False)
    refused = proc.returncode == 125 and "read" in proc.stderr.lower()
    assert refused or (proc.returncode != 0 and "WROTE" not in proc.stdout), (
        f"--read-only root was written: exit {proc.returncode}, {proc.stdout!r}")


def test_review_cp_out_of_a_symlink_copies_the_link(busybox: Path, tmp_path: Path) -> None:
    """``isobox cp CTR:/link DEST`` where ``/link -> /etc`` (absolute) crashes with a
    Python traceback (FileNotFoundError in os.replace): _copy_out extracts with tarfile's
    ``data`` filter, which drops an absolute link, then renames what is not there. Docker
    copies the link itself."""
    cid = isobox("create", "busybox", "true").stdout.strip()
    link = tmp_path / "link-src"
    link.symlink_to("/etc")
    isobox("cp", str(link), f"{cid}:/link")
    dest = tmp_path / "out"
    proc = isobox("cp", f"{cid}:/link", str(dest), check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert dest.is_symlink() and os.readlink(dest) == "/etc"


def test_review_logs_since_takes_a_relative_duration(busybox: Path) -> None:
    """``docker logs --since 10m`` (and ``--until``, ``events --since``) take a duration
    relative to now; isobox answers ``invalid time '1h' (RFC 3339 or seconds since the
    epoch)`` and exits 2."""
    cid = isobox("run", "-d", "busybox", "sh", "-c", "echo one; echo two").stdout.strip()
    assert isobox("wait", cid).stdout.strip() == "0"
    proc = isobox("logs", "--since", "1h", cid, check=False)
    assert (proc.returncode, proc.stdout) == (0, "one\ntwo\n"), proc.stderr
    proc = isobox("logs", "--since", "10m", "--tail", "1", cid, check=False)
    assert (proc.returncode, proc.stdout) == (0, "two\n"), proc.stderr
