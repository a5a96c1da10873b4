"""Start ``isoboxd`` when it is not running (``Client(autostart=True)``, the CLI).

The daemon is started detached (its own session, stdio to ``$ISOBOX_ROOT/isoboxd.log``), so
it outlives the command that started it, as a system service would. Two commands starting at
once serialise on a lock file beside the socket, and the second finds the first's daemon.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from isobox.client.errors import DaemonUnavailable
from isobox.paths import root_dir

START_TIMEOUT = 10.0


def answers(socket_path: Path) -> bool:
    """True when something accepts connections on the socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect(str(socket_path))
    except OSError:
        return False
    finally:
        sock.close()
    return True


def find_isoboxd() -> str:
    """``isoboxd`` next to this Python (a venv's bin), else on ``PATH``."""
    beside = Path(sys.executable).parent / "isoboxd"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("isoboxd")
    if found is None:
        raise DaemonUnavailable(
            f"isoboxd is not running and not installed (looked in {beside.parent} and PATH)")
    return found


def _log_tail(log: Path, n: int = 15) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def ensure_daemon(socket_path: Path, timeout: float = START_TIMEOUT) -> None:
    """Return once a daemon answers on ``socket_path``, starting one if needed."""
    if answers(socket_path):
        return
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(socket_path.parent / "isoboxd.start.lock",
                      os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if answers(socket_path):  # another command started it while we waited
            return
        root = root_dir()
        root.mkdir(parents=True, exist_ok=True)
        log = root / "isoboxd.log"
        exe = find_isoboxd()
        env = dict(os.environ)
        env.setdefault("ISOBOX_RUN", str(socket_path.parent))
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [exe], stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                start_new_session=True, close_fds=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if answers(socket_path):
                return
            if proc.poll() is not None:
                raise DaemonUnavailable(
                    f"isoboxd exited with status {proc.returncode} while starting; "
                    f"its log ({log}):\n{_log_tail(log)}")
            time.sleep(0.05)
        raise DaemonUnavailable(
            f"isoboxd did not answer on {socket_path} within {timeout:.0f} s; "
            f"its log ({log}):\n{_log_tail(log)}")
    finally:
        with contextlib.suppress(OSError):
            os.close(lock_fd)
