"""Frames of a raw container stream (version 1): attach, exec, and the monitor's control channel.

After ``HTTP/1.1 101 Switching Protocols`` with ``Upgrade: isobox-stream/1`` both ends speak
frames; the per-container monitor speaks the same frames on its own socket. A frame is an
8-byte header, then ``length`` bytes of payload::

    byte 0     type: 0 stdin, 1 stdout, 2 stderr, 3 control (JSON object)
    bytes 1-3  zero (reserved; a receiver refuses a frame where they are not)
    bytes 4-7  length, unsigned big-endian, at most MAX_PAYLOAD

Types 0-2 have docker's stdcopy header, so a docker-style demultiplexer reads the output.
Control frames carry one JSON object. Client to server: ``{"resize": [rows, cols]}``,
``{"closeStdin": true}``. Server to client: ``{"exit": {"exitCode": n, "signal": s|null}}``
(the last frame of a stream), ``{"error": {"kind": ..., "message": ...}}``. On the
monitor's socket the first frame of every connection is a control request
``{"v": 1, "op": ...}`` (see :mod:`isobox.compute.monitor`).
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

STDIN, STDOUT, STDERR, CONTROL = 0, 1, 2, 3
VERSION = 1
HEADER = struct.Struct(">B3xI")
MAX_PAYLOAD = 1 << 20
MAX_CONTROL = 1 << 16


class StreamError(Exception):
    """The peer sent something that is not a frame of this protocol (or went away mid-frame)."""


def encode(kind: int, payload: bytes) -> bytes:
    if kind not in (STDIN, STDOUT, STDERR, CONTROL):
        raise ValueError(f"unknown frame type {kind}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(kind, len(payload)) + payload


def encode_control(obj: dict[str, Any]) -> bytes:
    return encode(CONTROL, json.dumps(obj, separators=(",", ":")).encode())


def decode_header(header: bytes) -> tuple[int, int]:
    """``(type, length)``; raises :class:`StreamError` on a malformed header."""
    if len(header) != HEADER.size:
        raise StreamError("truncated frame header")
    if header[1:4] != b"\0\0\0":
        raise StreamError("reserved header bytes are not zero")
    kind, length = HEADER.unpack(header)
    if kind not in (STDIN, STDOUT, STDERR, CONTROL):
        raise StreamError(f"unknown frame type {kind}")
    limit = MAX_CONTROL if kind == CONTROL else MAX_PAYLOAD
    if length > limit:
        raise StreamError(f"frame of {length} bytes exceeds {limit}")
    return kind, length


def decode_control(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except ValueError as exc:
        raise StreamError(f"control frame is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise StreamError("control frame is not a JSON object")
    return obj


class FrameReader:
    """Incremental decoder: feed bytes as they arrive, take whole frames out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        out: list[tuple[int, bytes]] = []
        while len(self._buf) >= HEADER.size:
            kind, length = decode_header(bytes(self._buf[: HEADER.size]))
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            out.append((kind, bytes(self._buf[HEADER.size:end])))
            del self._buf[:end]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise StreamError("connection closed mid-frame")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    """One frame from a blocking socket; None at a clean end of stream (between frames)."""
    first = sock.recv(HEADER.size)
    if not first:
        return None
    header = first if len(first) == HEADER.size else first + _recv_exact(
        sock, HEADER.size - len(first))
    kind, length = decode_header(header)
    return kind, _recv_exact(sock, length) if length else b""


def send_control(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.sendall(encode_control(obj))
