"""Image references: ``name``, ``name:tag``, ``name@sha256:<hex>``, ``name:tag@sha256:<hex>``.

isobox keeps names as the user gave them (no implicit ``docker.io/library/`` prefix): the
store is local, and a registry prefix is just part of the name. A missing tag means
``latest``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from isobox.errors import InvalidReference

_NAME_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*(?::[0-9]+)?/)?"
_NAME_RE = re.compile(rf"^{_DOMAIN}{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class Reference:
    name: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    @property
    def tagged(self) -> str:
        """``name:tag``, the key under which a tag is stored."""
        return f"{self.name}:{self.tag or DEFAULT_TAG}"


def parse_reference(text: str, *, default_tag: bool = True) -> Reference:
    """Parse ``text``; raises :class:`InvalidReference` naming what is wrong."""
    if not text or len(text) > 512:
        raise InvalidReference(f"invalid image reference {text!r}: empty or too long")
    rest = text
    digest: str | None = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise InvalidReference(
                f"invalid image reference {text!r}: digest must be sha256:<64 hex digits>"
            )
    tag: str | None = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise InvalidReference(f"invalid image reference {text!r}: bad tag {tag!r}")
    if not _NAME_RE.match(rest):
        raise InvalidReference(
            f"invalid image reference {text!r}: name must be lowercase letters, digits and "
            "separators (., _, -, /)"
        )
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return Reference(rest, tag, digest)


def familiar(text: str) -> str:
    """Docker Hub's long form as people write it: ``docker.io/library/x:1`` is ``x:1``."""
    for prefix in ("docker.io/library/", "index.docker.io/library/", "docker.io/"):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text
