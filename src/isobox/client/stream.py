"""Attach and exec streams: frames of :mod:`isobox.spec.stream` to and from local files.

:func:`collect` gathers a whole stream in memory (``containers.run``, ``exec_run``).
:func:`pump` connects a stream to a terminal or pipes, as ``isobox run``/``exec``/``start -a``
do: output frames go to the local stdout and stderr, local stdin goes out as stdin frames
(and its end as ``closeStdin``). With a tty the local terminal is put in raw mode for the
stream's life (so Ctrl-C, Ctrl-D and arrows reach the container's terminal, which does the
line editing) and every SIGWINCH becomes a ``resize`` frame. Without a tty, SIGINT, SIGTERM
and SIGHUP sent to the CLI are handed to ``on_signal`` (the CLI forwards them to the
container, as docker's ``--sig-proxy``). Both return the exit code of the ``exit`` frame.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors  # socket imports it anyway
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from isobox import errors
from isobox.client._transport import raise_error
from isobox.spec import stream as frames

PROXIED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class RawStream:
    """Both directions of an upgraded connection, in frames of :mod:`isobox.spec.stream`."""

    def __init__(self, sock: socket.socket, initial: bytes = b"") -> None:
        self.sock = sock
        self._reader = frames.FrameReader()
        self._ready = self._reader.feed(initial) if initial else []
        self._eof = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_frames(self) -> list[tuple[int, bytes]] | None:
        """The frames one read brings (maybe none yet); None at the end of the stream."""
        if self._ready:
            out, self._ready = self._ready, []
            return out
        if self._eof:
            return None
        data = self.sock.recv(1 << 16)
        if not data:
            self._eof = True
            if self._reader.pending:
                raise frames.StreamError("connection closed mid-frame")
            return None
        return self._reader.feed(data)

    def has_buffered(self) -> bool:
        return bool(self._ready)

    def frames(self) -> Iterator[tuple[int, bytes]]:
        while (batch := self.recv_frames()) is not None:
            yield from batch

    def send_stdin(self, data: bytes) -> None:
        for i in range(0, len(data), frames.MAX_PAYLOAD):
            self.sock.sendall(frames.encode(frames.STDIN, data[i:i + frames.MAX_PAYLOAD]))

    def close_stdin(self) -> None:
        self.sock.sendall(frames.encode_control({"closeStdin": True}))

    def resize(self, rows: int, cols: int) -> None:
        self.sock.sendall(frames.encode_control({"resize": [rows, cols]}))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamEnded(errors.IsoboxError):
    """The stream closed before its ``exit`` frame (the daemon or the monitor went away)."""


def _control(payload: bytes) -> tuple[dict[str, Any] | None, int | None]:
    """(exit document, code) of an ``exit`` frame; raises an ``error`` frame's error."""
    obj = frames.decode_control(payload)
    if "error" in obj:
        import json

        raise_error(500, json.dumps({"error": obj["error"]}).encode())
    if "exit" in obj:
        doc = obj["exit"] or {}
        return doc, int(doc.get("exitCode", 0))
    return None, None


def collect(raw: RawStream) -> tuple[int, list[tuple[int, bytes]]]:
    """Read a stream to its end: the exit code and the output frames, in order."""
    chunks: list[tuple[int, bytes]] = []
    with raw:
        for kind, payload in raw.frames():
            if kind == frames.CONTROL:
                _, code = _control(payload)
                if code is not None:
                    return code, chunks
            elif kind in (frames.STDOUT, frames.STDERR):
                chunks.append((kind, payload))
    raise StreamEnded("the stream ended before the process's exit status")


def demux(raw: RawStream) -> Iterator[tuple[int, bytes]]:
    """``(stream type, bytes)`` as they arrive; ends after the exit frame."""
    with raw:
        for kind, payload in raw.frames():
            if kind == frames.CONTROL:
                _, code = _control(payload)
                if code is not None:
                    return
            else:
                yield kind, payload


def _write_all(fd: int, data: bytes) -> bool:
    """Write everything; False when the reader is gone (EPIPE)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            import select

            select.select([], [fd], [])
            continue
        except BrokenPipeError:
            return False
        view = view[n:]
    return True


class _Signals:
    """Signal handlers that only note the signal and wake the select loop."""

    def __init__(self, wanted: tuple[int, ...]) -> None:
        self.pending: list[int] = []
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old: dict[int, Any] = {}
        for sig in wanted:
            self._old[sig] = signal.signal(sig, self._note)

    def _note(self, sig: int, _frame: FrameType | None) -> None:
        self.pending.append(sig)
        with contextlib.suppress(OSError):
            os.write(self.wfd, b"\0")

    def take(self) -> list[int]:
        with contextlib.suppress(OSError):
            os.read(self.rfd, 4096)
        out, self.pending = self.pending, []
        return out

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        os.close(self.rfd)
        os.close(self.wfd)


def _terminal_size(fds: tuple[int, ...]) -> tuple[int, int] | None:
    for fd in fds:
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            return size.lines, size.columns
    return None


def pump(
    raw: RawStream,
    *,
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    tty: bool = False,
    on_signal: Callable[[int], None] | None = None,
) -> int:
    """Run a stream against local descriptors until its exit frame; returns the exit code.

    ``stdin`` None: nothing is forwarded. ``stdout``/``stderr`` default to the process's.
    """
    import threading  # here: collect() needs none of this, nor terminal handling

    out_fd = sys.stdout.fileno() if stdout is None else stdout
    err_fd = sys.stderr.fileno() if stderr is None else stderr
    main = threading.current_thread() is threading.main_thread()
    raw_mode = tty and stdin is not None and os.isatty(stdin)
    saved_attrs: list[Any] | None = None
    signals: _Signals | None = None
    sel = selectors.DefaultSelector()
    with contextlib.ExitStack() as stack:
        stack.callback(raw.close)
        stack.callback(sel.close)
        if main:
            wanted: tuple[int, ...] = ()
            if tty:
                wanted += (signal.SIGWINCH,)
            if on_signal is not None and not raw_mode:
                wanted += PROXIED
            if wanted:
                signals = _Signals(wanted)
                stack.callback(signals.close)
                sel.register(signals.rfd, selectors.EVENT_READ, "signal")
        if raw_mode:
            import termios
            import tty as ttymod

            assert stdin is not None
            saved_attrs = termios.tcgetattr(stdin)
            ttymod.setraw(stdin, termios.TCSANOW)
            fd_in = stdin

            def restore() -> None:
                with contextlib.suppress(termios.error):
                    termios.tcsetattr(fd_in, termios.TCSADRAIN, saved_attrs)

            stack.callback(restore)
        if tty:
            size = _terminal_size((out_fd, *(() if stdin is None else (stdin,))))
            if size:
                raw.resize(*size)
        sel.register(raw.fileno(), selectors.EVENT_READ, "stream")
        if stdin is not None:
            try:
                sel.register(stdin, selectors.EVENT_READ, "stdin")
            except (PermissionError, ValueError, OSError):
                # A regular file or /dev/null cannot be polled: send it whole, then its end.
                while data := os.read(stdin, 1 << 16):
                    raw.send_stdin(data)
                raw.close_stdin()
                stdin = None
        outputs_open = {frames.STDOUT: True, frames.STDERR: True}
        while True:
            # Frames that arrived with the 101 are buffered: handle them before waiting.
            tags = ["stream"] if raw.has_buffered() else [k.data for k, _ in sel.select()]
            for tag in tags:
                if tag == "signal" and signals is not None:
                    for sig in signals.take():
                        if sig == signal.SIGWINCH:
                            size = _terminal_size(
                                (out_fd, *(() if stdin is None else (stdin,))))
                            if size:
                                raw.resize(*size)
                        elif on_signal is not None:
                            on_signal(sig)
                elif tag == "stdin":
                    assert stdin is not None
                    try:
                        data = os.read(stdin, 1 << 16)
                    except OSError as exc:
                        if exc.errno not in (errno.EIO, errno.EBADF):
                            raise
                        data = b""
                    if data:
                        raw.send_stdin(data)
                    else:
                        sel.unregister(stdin)
                        stdin = None
                        with contextlib.suppress(OSError):
                            raw.close_stdin()
                elif tag == "stream":
                    batch = raw.recv_frames()
                    if batch is None:
                        raise StreamEnded("the stream ended before the process's exit status")
                    for kind, payload in batch:
                        if kind == frames.CONTROL:
                            _, code = _control(payload)
                            if code is not None:
                                return code
                        elif outputs_open.get(kind):
                            fd = out_fd if kind == frames.STDOUT else err_fd
                            outputs_open[kind] = _write_all(fd, payload)
