"""The daemon's end of a monitor's socket: one connection per call.

A connection per call keeps the monitor's protocol stateless (no multiplexing, no ids): a
request, a reply, and for streams the rest of the connection. :class:`NotFound` when no
monitor listens (the socket is missing, or refuses: the monitor ended).
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from isobox.compute.monitor import error_from_wire
from isobox.errors import IsoboxError, NotFound
from isobox.paths import socket_name
from isobox.spec import stream as S

PROTOCOL = 1


class MonitorClient:
    def __init__(self, socket_path: Path | str, timeout: float = 30.0) -> None:
        self.path = str(socket_path)
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            with socket_name(Path(self.path)) as name:
                sock.connect(name)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise NotFound(f"no monitor listens on {self.path}") from exc
        except OSError:
            sock.close()
            raise
        return sock

    @staticmethod
    def _reply(sock: socket.socket) -> dict[str, Any]:
        try:
            frame = S.read_frame(sock)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise NotFound("the monitor closed the connection (it is ending)") from exc
        except (S.StreamError, OSError) as exc:
            raise IsoboxError(f"monitor connection failed: {exc}") from exc
        if frame is None:
            raise NotFound("the monitor closed the connection (it is ending)")
        kind, payload = frame
        if kind != S.CONTROL:
            raise IsoboxError(f"monitor answered with a frame of type {kind}")
        msg = S.decode_control(payload)
        if "error" in msg:
            raise error_from_wire(msg["error"])
        return msg

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """One request, one reply (``{"ok": true, ...}``); errors raised as they came."""
        with self._connect() as sock:
            try:
                S.send_control(sock, {"v": PROTOCOL, "op": op, **fields})
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise NotFound("the monitor closed the connection (it is ending)") from exc
            return self._reply(sock)

    def open_stream(self, op: str, **fields: Any) -> tuple[socket.socket, dict[str, Any]]:
        """A request whose connection becomes the stream (``attach``/``exec``/
        ``subscribe`` without handoff): the socket and the reply."""
        sock = self._connect()
        try:
            S.send_control(sock, {"v": PROTOCOL, "op": op, **fields})
            return sock, self._reply(sock)
        except BaseException:
            sock.close()
            raise

    def _handoff(self, op: str, stream: socket.socket, fields: dict[str, Any]
                 ) -> dict[str, Any]:
        with self._connect() as sock:
            frame = S.encode_control({"v": PROTOCOL, "op": op, "handoff": True, **fields})
            socket.send_fds(sock, [frame], [stream.fileno()])
            return self._reply(sock)

    # ---- the ops -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def start(self) -> int:
        return int(self.request("start")["pid"])

    def signal(self, sig: int, all: bool = False) -> None:
        self.request("signal", signal=int(sig), all=all)

    def pause(self) -> None:
        self.request("pause")

    def resume(self) -> None:
        self.request("resume")

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.request("stats")["stats"]
        return stats

    def top(self) -> list[dict[str, Any]]:
        procs: list[dict[str, Any]] = self.request("top")["processes"]
        return procs

    def attach(self, sock: socket.socket, stdin: bool = False, stdout: bool = True,
               stderr: bool = True) -> None:
        """Hand ``sock`` to the monitor: it speaks the container's stream on it from now
        on (the caller may close its copy)."""
        self._handoff("attach", sock, {"stdin": stdin, "stdout": stdout, "stderr": stderr})

    def exec(self, sock: socket.socket, spec_json: dict[str, Any] | str) -> int:
        """Start an exec whose stream the monitor speaks on ``sock``; its pid."""
        spec = json.loads(spec_json) if isinstance(spec_json, str) else spec_json
        return int(self._handoff("exec", sock, {"process": spec}).get("pid", 0))

    def subscribe(self) -> Iterator[dict[str, Any]]:
        """Control frames: ``{"event": ...}`` as they happen, ``{"exit": status}`` last.

        The subscription is made by this call, not at the first read: what happens after
        it returns (a kill, say) is seen, even if the monitor ends before the first read."""
        sock, _ = self.open_stream("subscribe")
        sock.settimeout(None)
        return self._frames(sock)

    @staticmethod
    def _frames(sock: socket.socket) -> Iterator[dict[str, Any]]:
        with contextlib.closing(sock):
            while True:
                try:
                    frame = S.read_frame(sock)
                except (S.StreamError, OSError):
                    return
                if frame is None:
                    return
                kind, payload = frame
                if kind != S.CONTROL:
                    continue
                msg = S.decode_control(payload)
                yield msg
                if "exit" in msg:
                    return
