"""HTTP/1.1 to ``isoboxd`` over its unix socket: a small client of our own, on ``socket``.

Why not :mod:`http.client`: importing it costs ~16 ms (it pulls in ``email.parser``,
``email.message`` and ``ssl``), measured with ``python -X importtime`` on the dev machine,
which was a sixth of ``isobox ps`` and most of what the SDK itself added to a command's
start. Talking to one local daemon needs little of it: one request per connection, a
``Content-Length`` or chunked request body, and an answer delimited by ``Content-Length``,
by chunks or by the close. That is what this module does, and no more: no proxies, no TLS,
no redirects, no ``Expect: 100-continue`` (1xx answers other than ``101`` are skipped).

Three kinds of exchange:

* plain requests with JSON (or raw) bodies: :meth:`Transport.request` returns a
  :class:`Response`, or raises the daemon's error as the class of :mod:`isobox.errors` named
  by the body's ``error.kind``;
* chunked JSON-line streams (logs, events, stats): :meth:`Response.lines`, each line as soon
  as its chunk arrives;
* upgraded raw streams (attach, exec): :meth:`Transport.upgrade`; bytes the daemon sent right
  after the ``101`` head are kept for the :class:`~isobox.client.stream.RawStream`, never
  lost. The frame code is imported then, not for a plain request (``ps``).

Each request uses its own connection (the contract's rule): the daemon is local, a connect
costs microseconds, and a connection never carries the state of an earlier, half-read
stream. A connection that ends inside an answer, or before one, is
:class:`~isobox.client.errors.DaemonUnavailable`. A daemon that answers before it has read a
request body (an import with a bad tag) is heard: a broken pipe while sending stops the
upload and the answer is read.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from isobox import errors
from isobox.client.errors import DaemonUnavailable

if TYPE_CHECKING:
    from isobox.client.stream import RawStream

#: Equal to :data:`isobox.spec.wire.API_VERSION` and ``STREAM_PROTOCOL`` (a test checks it):
#: written here so that the hot path does not build wire's ``TypedDict`` classes (~2 ms).
API_VERSION = "v1"
STREAM_PROTOCOL = "isobox-stream/1"

Query = Mapping[str, str | int | float | bool | Sequence[str] | None]
_HEAD_LIMIT = 64 * 1024
_BLOCK = 1 << 16
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")


_BY_STATUS: dict[int, type[errors.IsoboxError]] = {
    400: errors.InvalidArgument, 404: errors.NotFound, 408: errors.WaitTimeout,
    409: errors.Conflict, 507: errors.StoreFull,
}


def raise_error(status: int, body: bytes) -> None:
    """Raise what an error answer carries: the ``isobox.errors`` class its ``kind`` names."""
    try:
        detail = json.loads(body)["error"]
        kind = str(detail["kind"])
        message = str(detail["message"])
        field = detail.get("field")
    except (ValueError, KeyError, TypeError):
        text = body.decode(errors="replace").strip() or "no error body"
        raise errors.IsoboxError(f"daemon answered {status}: {text}") from None
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.IsoboxError)):
        # A kind this client does not know (a newer daemon): the class of its status.
        cls = _BY_STATUS.get(status, errors.IsoboxError)
    # Some classes take structured arguments; the message the daemon sent is what counts.
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    if isinstance(exc, errors.InvalidDocument):
        exc.field = field if isinstance(field, str) else None
    raise exc


def _quote(text: str, safe: bytes = b"") -> str:
    """Percent-encoding as :func:`urllib.parse.quote` does it (UTF-8, unreserved kept)."""
    keep = _UNRESERVED | frozenset(safe)
    return "".join(chr(b) if b in keep else f"%{b:02X}" for b in text.encode())


def quote_ref(ref: str) -> str:
    """A reference as one path segment (``busybox:latest``, ``a/b``)."""
    return _quote(ref)


def _query(params: Query | None) -> str:
    """``?k=v&k=v2`` as :func:`urllib.parse.urlencode` writes it (``quote_plus``)."""
    if not params:
        return ""
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        if value is None or value is False:
            continue
        if value is True:
            pairs.append((key, "1"))
        elif isinstance(value, str | int | float):
            pairs.append((key, str(value)))
        else:
            pairs += [(key, str(v)) for v in value]
    if not pairs:
        return ""
    return "?" + "&".join(
        _quote(k, b" ").replace(" ", "+") + "=" + _quote(v, b" ").replace(" ", "+")
        for k, v in pairs)


def _gone(what: str, exc: BaseException | str) -> DaemonUnavailable:
    return DaemonUnavailable(f"isoboxd went away during {what}: {exc}")


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise errors.IsoboxError(f"isoboxd sent a malformed status line: {lines[0]!r}")
    hdrs: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            hdrs[key.strip().lower()] = value.strip()
    return int(parts[1]), hdrs


class Response:
    """An answer being read from its connection; closing it closes the connection.

    The body is decoded as it is read (``Content-Length``, chunked, or up to the close), and
    a read waits for the socket only when nothing decoded is buffered, so a stream's lines
    come as they are sent.
    """

    def __init__(self, sock: socket.socket, status: int, headers: dict[str, str],
                 buffered: bytes, *, what: str, no_body: bool = False) -> None:
        self.sock: socket.socket | None = sock
        self.status = status
        self.headers = headers
        self._what = what
        self._raw = bytearray(buffered)  # undecoded bytes off the socket
        self._out = bytearray()  # decoded body bytes not yet handed out
        self._chunked = headers.get("transfer-encoding", "").lower().endswith("chunked")
        self._length: int | None = None  # body bytes left (Content-Length)
        self._chunk_left = 0  # data bytes left in the current chunk
        self._crlf = False  # the CRLF after a chunk's data is still to be read
        self._done = no_body
        if no_body or self._chunked or "content-length" not in headers:
            return
        try:
            self._length = int(headers["content-length"])
        except ValueError:
            raise errors.IsoboxError(
                f"isoboxd sent a bad Content-Length: {headers['content-length']!r}") from None
        self._done = self._length == 0

    # ---- the wire --------------------------------------------------------------------------

    def _recv(self) -> bool:
        """One read off the socket into the raw buffer; False at its end."""
        if self.sock is None:
            return False
        data = self.sock.recv(_BLOCK)
        if not data:
            return False
        self._raw += data
        return True

    def _need(self, n: int) -> None:
        while len(self._raw) < n:
            if not self._recv():
                raise _gone(self._what, "the connection closed inside the answer")

    def _line(self) -> bytes:
        while (end := self._raw.find(b"\r\n")) < 0:
            if len(self._raw) > _HEAD_LIMIT:
                raise errors.IsoboxError("isoboxd sent an oversized chunk line")
            if not self._recv():
                raise _gone(self._what, "the connection closed inside the answer")
        line = bytes(self._raw[:end])
        del self._raw[:end + 2]
        return line

    def _take(self, n: int) -> bytes:
        data = bytes(self._raw[:n])
        del self._raw[:n]
        return data

    def _piece(self, limit: int) -> bytes:
        """Up to ``limit`` (> 0) decoded bytes, waiting for the socket only when none are
        buffered; b"" at the end of the body."""
        if self._done:
            return b""
        if self._chunked:
            if not self._chunk_left:
                if self._crlf:
                    self._need(2)
                    if self._raw[:2] != b"\r\n":
                        raise errors.IsoboxError("isoboxd sent a malformed chunk")
                    del self._raw[:2]
                    self._crlf = False
                size = self._line().split(b";", 1)[0].strip()
                try:
                    self._chunk_left = int(size, 16)
                except ValueError:
                    raise errors.IsoboxError(
                        f"isoboxd sent a bad chunk size: {size!r}") from None
                if self._chunk_left == 0:
                    while self._line():  # trailers, up to the empty line
                        pass
                    self._done = True
                    return b""
            if not self._raw:
                self._need(1)
            n = min(limit, self._chunk_left, len(self._raw))
            self._chunk_left -= n
            self._crlf = self._chunk_left == 0
            return self._take(n)
        if self._length is not None:
            if not self._raw:
                self._need(1)
            n = min(limit, self._length, len(self._raw))
            self._length -= n
            self._done = self._length == 0
            return self._take(n)
        # Neither: the body is everything up to the close.
        if not self._raw and not self._recv():
            self._done = True
            return b""
        return self._take(min(limit, len(self._raw)))

    # ---- the body --------------------------------------------------------------------------

    def read1(self, n: int = _BLOCK) -> bytes:
        """What is there (at least a byte, waiting if need be); b"" at the end."""
        if n <= 0:
            return b""
        if self._out:
            data = bytes(self._out[:n])
            del self._out[:n]
            return data
        return self._piece(n)

    def read(self, n: int = -1) -> bytes:
        """``n`` bytes of the body (fewer at its end), or all of it (``n`` < 0)."""
        out = bytearray()
        while n < 0 or len(out) < n:
            data = self.read1(_BLOCK if n < 0 else n - len(out))
            if not data:
                break
            out += data
        return bytes(out)

    def readline(self) -> bytes:
        """One line with its ``\\n`` (the last may have none); b"" at the end."""
        while (end := self._out.find(b"\n")) < 0:
            data = self._piece(_BLOCK)
            if not data:
                line = bytes(self._out)
                self._out.clear()
                return line
            self._out += data
        line = bytes(self._out[:end + 1])
        del self._out[:end + 1]
        return line

    def json(self) -> Any:
        try:
            data = self.read()
        finally:
            self.close()
        return json.loads(data) if data else None

    def lines(self) -> Iterator[Any]:
        """The body as JSON lines (one object per line), as they arrive."""
        try:
            while line := self.readline():
                if line.strip():
                    yield json.loads(line)
        finally:
            self.close()

    def chunks(self, size: int = _BLOCK) -> Iterator[bytes]:
        try:
            while chunk := self.read1(size):
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Transport:
    """Requests to one daemon socket; ``timeout`` applies to connect and each read.

    ``on_unavailable``: called once when the first connect finds no daemon (the CLI's
    autostart); the connect is then tried again. After one connect succeeded it is not
    called any more: a daemon that goes away later is an error, not a restart.
    """

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float | None = None,
                 on_unavailable: Callable[[], None] | None = None) -> None:
        self.socket_path = os.fspath(socket_path)
        self.timeout = timeout
        self.on_unavailable = on_unavailable

    def _url(self, path: str, query: Query | None) -> str:
        return f"/{API_VERSION}{path}{_query(query)}"

    def _connect(self) -> socket.socket:
        try:
            return self._open()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            hook, self.on_unavailable = self.on_unavailable, None
            if hook is None:
                raise self._unavailable(exc) from exc
            hook()
        try:
            return self._open()
        except OSError as exc:
            raise self._unavailable(exc) from exc

    def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            if not isinstance(exc, FileNotFoundError | ConnectionRefusedError):
                raise self._unavailable(exc) from exc
            raise
        except BaseException:
            sock.close()
            raise
        self.on_unavailable = None  # a daemon answered: no autostart from now on
        return sock

    def _unavailable(self, exc: OSError) -> DaemonUnavailable:
        return DaemonUnavailable(
            f"cannot connect to isoboxd at {self.socket_path}: {exc.strerror or exc} "
            "(is it running? `isoboxd`, or Client(autostart=True))")

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Query | None = None,
        json_body: Any = None,
        body: bytes | BinaryIO | None = None,
        length: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send one request; an answer of 400 or more is raised as the daemon's error."""
        hdrs = {"Host": "localhost", **(headers or {})}
        data: bytes | BinaryIO | None = body
        if json_body is not None:
            data = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        if isinstance(data, bytes):
            hdrs["Content-Length"] = str(len(data))
        elif data is not None and length is not None:
            hdrs["Content-Length"] = str(length)
        elif data is not None:
            hdrs["Transfer-Encoding"] = "chunked"
        elif method in ("POST", "PUT"):
            hdrs["Content-Length"] = "0"
        head = f"{method} {self._url(path, query)} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
        what = f"{method} {path}"
        sock = self._connect()
        try:
            if isinstance(data, bytes) or data is None:
                sock.sendall(head.encode("latin-1") + (data or b""))
            else:
                sock.sendall(head.encode("latin-1"))
                _send_file(sock, data, chunked="Transfer-Encoding" in hdrs)
            status, resp_hdrs, rest = _read_head(sock, what)
            while 100 <= status < 200:  # informational answers: the real one follows
                status, resp_hdrs, rest = _read_head(sock, what, rest)
        except OSError as exc:
            sock.close()
            raise _gone(what, exc) from exc
        except BaseException:
            sock.close()
            raise
        resp = Response(sock, status, resp_hdrs, rest, what=what,
                        no_body=status in (204, 304) or method == "HEAD")
        if status >= 400:
            with resp:
                raw = resp.read()
            raise_error(status, raw)
        return resp

    def upgrade(
        self, method: str, path: str, *, query: Query | None = None, json_body: Any = None
    ) -> RawStream:
        """A request with ``Upgrade: isobox-stream/1``; after the ``101``, a frame stream."""
        payload = json.dumps(json_body).encode() if json_body is not None else b""
        head = (
            f"{method} {self._url(path, query)} HTTP/1.1\r\n"
            "Host: localhost\r\n"
            "Connection: Upgrade\r\n"
            f"Upgrade: {STREAM_PROTOCOL}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        from isobox.client.stream import RawStream

        what = f"{method} {path}"
        sock = self._connect()
        try:
            sock.settimeout(None)
            sock.sendall(head + payload)
            status, hdrs, rest = _read_head(sock, what)
            if status != 101:
                with Response(sock, status, hdrs, rest, what=what,
                              no_body=status in (204, 304)) as resp:
                    body = resp.read()
                raise_error(status, body)
                raise errors.IsoboxError(f"daemon answered {status} instead of 101")
        except OSError as exc:
            sock.close()
            raise _gone(what, exc) from exc
        except BaseException:
            sock.close()
            raise
        return RawStream(sock, rest)


def _send_file(sock: socket.socket, data: BinaryIO, *, chunked: bool) -> None:
    """Copy a file-like body to the socket (as chunks when its length is not known).

    A daemon that answers early and closes (a refused import) makes the send fail with a
    broken pipe: the upload stops there and the caller reads the answer."""
    try:
        while block := data.read(1 << 20):
            sock.sendall(b"%x\r\n%b\r\n" % (len(block), block) if chunked else block)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass


def _read_head(sock: socket.socket, what: str,
               buf: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and the bytes read past the head."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        if len(buf) > _HEAD_LIMIT:
            raise errors.IsoboxError("isoboxd sent an oversized response head")
        chunk = sock.recv(4096)
        if not chunk:
            raise _gone(what, "the connection closed before the answer")
        buf += chunk
    status, hdrs = _parse_head(buf[:end])
    return status, hdrs, buf[end + 4:]
