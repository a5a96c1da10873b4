"""The SDK's errors: the daemon's (the classes of :mod:`isobox.errors`, re-raised by name)
and the two only a client can see."""

from __future__ import annotations

from typing import TYPE_CHECKING

from isobox.errors import IsoboxError

if TYPE_CHECKING:
    from isobox.client.api import Container


class DaemonUnavailable(IsoboxError):
    """``isoboxd`` does not answer on its socket (not started, or gone)."""

    exit_code = 125


class ContainerError(IsoboxError):
    """``containers.run`` (not detached): the container exited with a non-zero code.

    As docker-py's: ``exit_status``, ``stderr`` (bytes), ``container``, ``command``, ``image``.
    """

    def __init__(
        self, container: Container, exit_status: int, command: list[str] | None, image: str,
        stderr: bytes,
    ) -> None:
        tail = stderr.decode(errors="replace").strip()
        super().__init__(
            f"command {command!r} in image {image!r} returned non-zero exit status "
            f"{exit_status}" + (f": {tail}" if tail else "")
        )
        self.container = container
        self.exit_status = exit_status
        self.command = command
        self.image = image
        self.stderr = stderr
