"""``isoboxd``: the compute service behind the API socket.

Start-up order matters and is fixed here:

1. arguments, logging (stderr), ``ISOBOX_ROOT`` / ``ISOBOX_RUN`` exported so every part of
   the engine sees the same folders;
2. the daemon lock: ``flock`` on ``$ISOBOX_RUN/isoboxd.lock`` (the file holds our pid), so
   two daemons never share one run folder — the second one exits with a message;
3. ``ComputeService.open()`` **before any thread exists**: it forks the spawner's zygote,
   and forking a threaded process is how deadlocks are made (DESIGN.md);
4. the socket ``$ISOBOX_RUN/isoboxd.sock`` (0660), bound under a temporary name and renamed
   into place, replacing a stale one;
5. serve until SIGTERM or SIGINT, then stop accepting, close the socket and the service.
   Containers keep running: each is owned by its monitor, which outlives the daemon.

There is no self-daemonizing: ``isoboxd`` always runs in the foreground (a service manager
or a test supervises it); ``--foreground`` is accepted for scripts that say it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from isobox.errors import IsoboxError
from isobox.paths import root_dir, run_dir

log = logging.getLogger("isoboxd")

LOCK_NAME = "isoboxd.lock"
SOCKET_NAME = "isoboxd.sock"


class AlreadyRunning(Exception):
    """Another isoboxd holds the lock of this run folder."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="isoboxd", description="the isobox compute service")
    p.add_argument("--root", type=Path, help="state folder (default $ISOBOX_ROOT or "
                   "/var/lib/isobox)")
    p.add_argument("--run", type=Path, help="sockets folder (default $ISOBOX_RUN or "
                   "/run/isobox)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="default info")
    p.add_argument("--foreground", action="store_true", default=True,
                   help="run in the foreground (always; accepted for scripts)")
    return p.parse_args(argv)


def acquire_lock(run: Path) -> int:
    """The daemon lock of ``run``: an fd holding ``flock(LOCK_EX)``, our pid written in the
    file. Raises :class:`AlreadyRunning` naming the holder's pid."""
    path = run / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(f"another isoboxd (pid {holder}) runs on {run}") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_lock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)  # closing the only descriptor drops the flock


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        stream=sys.stderr, level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    root = (args.root or root_dir()).absolute()
    run = (args.run or run_dir()).absolute()
    os.environ["ISOBOX_ROOT"] = str(root)
    os.environ["ISOBOX_RUN"] = str(run)
    try:
        root.mkdir(parents=True, exist_ok=True)
        run.mkdir(parents=True, exist_ok=True)
        lock = acquire_lock(run)
    except (AlreadyRunning, OSError) as exc:
        log.error("%s", exc)
        return 1
    try:
        return _serve(root, run)
    except IsoboxError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return 1
    finally:
        release_lock(lock)


def _serve(root: Path, run: Path) -> int:
    from isobox.compute.service import ComputeService

    from .handlers import build_router
    from .server import ApiServer, serve_in_thread

    service = ComputeService(root, run)
    service.open()  # forks the zygote: no thread may exist before this line
    try:
        server = ApiServer(run / SOCKET_NAME, build_router(service, tmp_dir=root / "tmp"))
    except BaseException:
        service.close()
        raise
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = serve_in_thread(server)
    log.info("isoboxd %d listening on %s (root %s)", os.getpid(), server.socket_path, root)
    try:
        while not stop.wait(0.5):
            if not thread.is_alive():
                log.error("the HTTP server stopped unexpectedly")
                return 1
    finally:
        server.shutdown()
        server.server_close()  # removes the socket: clients see the daemon is gone
        service.close()
        log.info("stopped; containers keep running under their monitors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
