"""The one exception tree of isobox.

Every error the engine raises on purpose derives from :class:`IsoboxError`. The API maps
these classes to HTTP status codes at its edge only; the CLI maps them to exit codes and
one line on stderr. Raw OS failures are wrapped where they happen so that the message names
the operation, the path or id, and the errno.

::

    IsoboxError                      base; ``.exit_code`` for the CLI, ``.http_status``
    ├── InvalidArgument              bad input from a user or a document (400)
    │   ├── InvalidReference         an image reference that does not parse
    │   ├── InvalidDocument          a JSON document that fails validation (names the field)
    │   └── IsolationUnavailable     an isolation this engine cannot run here (or yet)
    ├── NotFound                     something named does not exist (404)
    │   └── ImageNotFound
    ├── Conflict                     the name or object exists / is in use, or the step is
    │   │                            illegal in the object's state (409)
    │   └── ImageInUse               an image a container or another tag still needs
    ├── ImageError                   an image that cannot be accepted (422)
    │   ├── DigestMismatch           content does not hash to the digest that names it
    │   └── UnsafeLayer              a layer entry that would escape or is not allowed
    ├── StoreError                   the store on disk is damaged or out of space (500/507)
    │   └── StoreFull                ENOSPC / EDQUOT while writing
    ├── WaitTimeout                  a wait gave up before its condition held (408)
    ├── ToolMissing                  a host tool the operation needs is absent (500)
    ├── VmError                      a utility VM would not start or died (QEMU's exit) (500)
    └── SystemError_                 a system call failed: ``op``, ``path``, ``errno`` (500)
"""

from __future__ import annotations

import errno as _errno


class IsoboxError(Exception):
    """Base of every error isobox raises on purpose."""

    exit_code: int = 1
    http_status: int = 500


class InvalidArgument(IsoboxError):
    exit_code = 2
    http_status = 400


class InvalidReference(InvalidArgument):
    pass


class InvalidDocument(InvalidArgument):
    """``field``: the JSON path of the first bad field (``process.env[2]``), when known."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class IsolationUnavailable(InvalidArgument):
    """An isolation this engine cannot run here (``vm`` without utility-VM assets)."""


class NotFound(IsoboxError):
    http_status = 404


class ImageNotFound(NotFound):
    pass


class Conflict(IsoboxError):
    http_status = 409


class ImageInUse(Conflict):
    pass


class ImageError(IsoboxError):
    http_status = 422


class DigestMismatch(ImageError):
    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: digest mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class UnsafeLayer(ImageError):
    def __init__(self, entry: str, reason: str) -> None:
        super().__init__(f"layer entry {entry!r}: {reason}")
        self.entry = entry
        self.reason = reason


class StoreError(IsoboxError):
    pass


class StoreFull(StoreError):
    http_status = 507


class ToolMissing(IsoboxError):
    pass


class VmError(IsoboxError):
    """A utility VM failed: QEMU would not start, exited, or its guest never came up.
    The message carries QEMU's exit and the tail of its console."""


class UvmAssetsError(IsoboxError):
    """Building the utility-VM assets failed: a download, an extraction, a compile or mkfs.
    The message names the step and carries the tool's error output."""


class WaitTimeout(IsoboxError):
    """``wait`` gave up before the condition held."""

    http_status = 408


class SystemError_(IsoboxError):
    """A system call failed. Carries the operation, the path or id, and the errno."""

    def __init__(self, op: str, target: str, err: int) -> None:
        name = _errno.errorcode.get(err, str(err))
        super().__init__(f"{op} {target}: {name} ({err}): {_strerror(err)}")
        self.op = op
        self.target = target
        self.errno = err


def _strerror(err: int) -> str:
    import os

    return os.strerror(err)


def from_oserror(op: str, target: str, exc: OSError) -> IsoboxError:
    """Wrap an OSError: out-of-space errors become :class:`StoreFull`."""
    err = exc.errno or 0
    if err in (_errno.ENOSPC, _errno.EDQUOT):
        full = StoreFull(f"{op} {target}: no space left on device")
        full.__cause__ = exc
        return full
    wrapped = SystemError_(op, target, err)
    wrapped.__cause__ = exc
    return wrapped
