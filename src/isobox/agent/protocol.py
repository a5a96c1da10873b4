"""The host<->guest agent wire format (row 1): versioned frames, as hcsshim's GCS bridge.

Both ends of the utility VM's agent channel (a virtio-serial port in the VM, a unix socket
on the host) speak frames. Every frame is a fixed 16-byte header, then ``length`` bytes of
body::

    offset 0   type    u32 little-endian: MAGIC (0x1B0A0000) | kind
                       kind 1 request, 2 response, 3 notification, 4 stream data
    offset 4   length  u32 little-endian: body bytes after the header (not counting it)
    offset 8   id      u64 little-endian: request id (request, and the response to it);
                       0 for a notification; the stream key for stream data

The header never changes between protocol versions (so a peer can always read a
``negotiate`` and refuse it cleanly); what versions change is the JSON vocabulary.

* **request** (host → guest): a JSON object ``{"op": OP, ...}``; ids are chosen by the
  host, unique among its outstanding requests.
* **response** (guest → host), same id: ``{"ok": true, ...}`` or
  ``{"error": {"kind": "<isobox.errors class>", "message": ...}}``.
* **notification** (guest → host), id 0: ``{"event": EVENT, ...}``: ``ready`` (the agent is
  up; carries ``versions``), ``exit`` (a process ended: ``container``, ``stream``,
  ``exitCode``, ``signal``), ``protocolError`` (a frame was refused: ``message``).
* **stream data**: raw bytes, not JSON. ``id = stream << 2 | channel`` (channel 0 stdin,
  1 stdout, 2 stderr; ``stream`` is the number the host gave the process at create/exec).
  stdin goes host → guest, output guest → host. An **empty** body ends that channel
  (stdin: close the process's stdin; output: the pipe was closed, all output was sent).

Version negotiation: the first request must be ``{"op": "negotiate", "versions": [..]}``
(the versions the host speaks); the guest picks the highest it also speaks and answers
``{"ok": true, "version": v}``, or an error (:class:`VersionMismatch`) naming both lists.
Any other request before a successful negotiate is refused.

Limits: a JSON body is at most :data:`MAX_JSON` bytes, stream data at most
:data:`MAX_DATA` per frame (senders cut output into :data:`DATA_CHUNK` pieces). A header
with a wrong magic, an unknown kind or an oversized length is a :class:`ProtocolError`;
the :class:`FrameReader` then drops bytes up to the next plausible header, so one bad frame
is refused without ending the channel. A well-framed request whose body is not a JSON
object is answered with an error response to its id.

This module is imported by the guest: standard library and ``isobox.errors`` only.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from isobox import errors

MAGIC = 0x1B0A0000
MAGIC_MASK = 0xFFFF0000
REQUEST, RESPONSE, NOTIFICATION, DATA = 1, 2, 3, 4
KINDS = (REQUEST, RESPONSE, NOTIFICATION, DATA)
KIND_NAMES = {REQUEST: "request", RESPONSE: "response", NOTIFICATION: "notification",
              DATA: "data"}
HEADER = struct.Struct("<IIQ")
MAX_JSON = 1 << 20
MAX_DATA = 1 << 18
DATA_CHUNK = 1 << 15
MAX_ID = (1 << 64) - 1
VERSIONS: tuple[int, ...] = (1,)
STDIN, STDOUT, STDERR = 0, 1, 2
# Bytes 2-3 of every header (the magic's half of the little-endian type word): the reader
# resynchronises on them after a malformed header.
_MAGIC_BYTES = struct.pack("<I", MAGIC)[2:4]


class ProtocolError(errors.IsoboxError):
    """A frame that does not follow this protocol (bad header, body, or sequence)."""


class VersionMismatch(ProtocolError):
    """Host and guest share no protocol version."""


@dataclass(frozen=True)
class Frame:
    kind: int
    id: int
    body: bytes

    def json(self) -> dict[str, Any]:
        """The body as a JSON object; :class:`ProtocolError` if it is not one."""
        if self.kind == DATA:
            raise ProtocolError("stream data frames carry no JSON")
        try:
            obj = json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"{KIND_NAMES[self.kind]} {self.id}: body is not JSON: "
                                f"{exc}") from exc
        if not isinstance(obj, dict):
            raise ProtocolError(f"{KIND_NAMES[self.kind]} {self.id}: body is not a JSON "
                                "object")
        return obj


def stream_key(stream: int, channel: int) -> int:
    """The id of a stream-data frame for ``channel`` (0/1/2) of process ``stream``."""
    if channel not in (STDIN, STDOUT, STDERR):
        raise ValueError(f"unknown channel {channel}")
    if not 0 < stream < (1 << 62):
        raise ValueError(f"stream number {stream} out of range")
    return stream << 2 | channel


def split_key(key: int) -> tuple[int, int]:
    """``(stream, channel)`` of a stream-data frame's id; channel 3 is refused."""
    stream, channel = key >> 2, key & 3
    if channel == 3 or stream == 0:
        raise ProtocolError(f"stream data id {key} names no stream channel")
    return stream, channel


def encode(kind: int, frame_id: int, body: bytes) -> bytes:
    if kind not in KINDS:
        raise ValueError(f"unknown frame kind {kind}")
    if not 0 <= frame_id <= MAX_ID:
        raise ValueError(f"frame id {frame_id} out of range")
    limit = MAX_DATA if kind == DATA else MAX_JSON
    if len(body) > limit:
        raise ValueError(f"{KIND_NAMES[kind]} body of {len(body)} bytes exceeds {limit}")
    return HEADER.pack(MAGIC | kind, len(body), frame_id) + body


def encode_json(kind: int, frame_id: int, obj: dict[str, Any]) -> bytes:
    return encode(kind, frame_id, json.dumps(obj, separators=(",", ":")).encode())


def request(frame_id: int, op: str, **fields: Any) -> bytes:
    return encode_json(REQUEST, frame_id, {"op": op, **fields})


def response(frame_id: int, **fields: Any) -> bytes:
    return encode_json(RESPONSE, frame_id, {"ok": True, **fields})


def error_response(frame_id: int, exc: BaseException) -> bytes:
    return encode_json(RESPONSE, frame_id, {"error": error_to_wire(exc)})


def notification(event: str, **fields: Any) -> bytes:
    return encode_json(NOTIFICATION, 0, {"event": event, **fields})


def data(stream: int, channel: int, payload: bytes) -> bytes:
    return encode(DATA, stream_key(stream, channel), payload)


def decode_header(header: bytes) -> tuple[int, int, int]:
    """``(kind, length, id)``; :class:`ProtocolError` on a malformed header."""
    if len(header) != HEADER.size:
        raise ProtocolError("truncated frame header")
    word, length, frame_id = HEADER.unpack(header)
    if word & MAGIC_MASK != MAGIC:
        raise ProtocolError(f"bad frame magic {word:#010x}")
    kind = word & ~MAGIC_MASK
    if kind not in KINDS:
        raise ProtocolError(f"unknown frame kind {kind}")
    limit = MAX_DATA if kind == DATA else MAX_JSON
    if length > limit:
        raise ProtocolError(f"{KIND_NAMES[kind]} frame of {length} bytes exceeds {limit}")
    return kind, length, frame_id


def pick_version(offered: Any, ours: tuple[int, ...] = VERSIONS) -> int:
    """The guest's choice among the host's ``offered`` versions: the highest in common."""
    if not isinstance(offered, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in offered):
        raise ProtocolError("negotiate: versions must be a list of integers")
    common = set(offered) & set(ours)
    if not common:
        raise VersionMismatch(f"no common agent protocol version: the host speaks "
                              f"{sorted(offered)}, the guest {sorted(ours)}")
    return int(max(common))


def error_to_wire(exc: BaseException) -> dict[str, str]:
    kind = type(exc).__name__ if isinstance(exc, errors.IsoboxError) else "IsoboxError"
    message = str(exc) if isinstance(exc, errors.IsoboxError) else \
        f"{type(exc).__name__}: {exc}"
    return {"kind": kind, "message": message}


def error_from_wire(detail: Any) -> errors.IsoboxError:
    """The ``isobox.errors`` class an error response names (else :class:`IsoboxError`)."""
    if not isinstance(detail, dict):
        return ProtocolError(f"malformed error response: {detail!r}")
    kind = str(detail.get("kind", ""))
    message = str(detail.get("message", ""))
    local = {"ProtocolError": ProtocolError, "VersionMismatch": VersionMismatch}
    cls = local.get(kind) or getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.IsoboxError) and \
            cls is not errors.SystemError_:
        try:
            return cls(message)
        except TypeError:
            pass
    return errors.IsoboxError(message)


class FrameReader:
    """Incremental decoder: :meth:`feed` bytes as they arrive, take frames with
    :meth:`next`. After a malformed header :meth:`next` raises :class:`ProtocolError` once
    and has already skipped to the next plausible header, so the caller reports the error
    and goes on reading."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk

    def next(self) -> Frame | None:
        if len(self._buf) < HEADER.size:
            return None
        try:
            kind, length, frame_id = decode_header(bytes(self._buf[:HEADER.size]))
        except ProtocolError:
            self._resync()
            raise
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[HEADER.size:end])
        del self._buf[:end]
        return Frame(kind, frame_id, body)

    def frames(self, chunk: bytes = b"") -> list[Frame]:
        """Feed ``chunk`` and return every whole frame (a malformed one raises)."""
        self.feed(chunk)
        out: list[Frame] = []
        while (f := self.next()) is not None:
            out.append(f)
        return out

    def _resync(self) -> None:
        """Drop the bad header's first byte, then up to the next offset whose bytes 2-3 are
        the magic's (keeping a tail that may be the start of one)."""
        pos = self._buf.find(_MAGIC_BYTES, 3)
        if pos < 0:
            keep = min(len(self._buf) - 1, 3)
            del self._buf[:len(self._buf) - keep]
        else:
            del self._buf[:pos - 2]

    @property
    def pending(self) -> int:
        return len(self._buf)
