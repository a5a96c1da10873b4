"""The name files a container sees: ``/etc/hosts`` and ``/etc/resolv.conf``.

Containers on one network find each other by name through their hosts files (no DNS
server to run). A container's hosts file is bind-mounted read-only into it, so when a
member joins or leaves, the file is rewritten *in place*: same inode, which the bind mount
keeps showing (a rename would leave the container looking at the old file).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from isobox.errors import from_oserror

_BASE = (
    "127.0.0.1\tlocalhost\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n"
    "fe00::0\tip6-localnet\n"
    "ff00::0\tip6-mcastprefix\n"
    "ff02::1\tip6-allnodes\n"
    "ff02::2\tip6-allrouters\n"
)


def hosts_text(entries: Iterable[tuple[str, list[str]]]) -> str:
    """The hosts file: the loopback lines, then ``ip names...`` for each entry (the
    container's own first, then the other members), names not repeated."""
    out = [_BASE]
    seen: set[str] = {"localhost"}
    for ip, names in entries:
        fresh = [n for n in dict.fromkeys(names) if n and n not in seen]
        seen.update(fresh)
        if fresh:
            out.append(f"{ip}\t{' '.join(fresh)}\n")
    return "".join(out)


def rewrite_in_place(path: Path, text: str) -> bool:
    """Replace the content of ``path`` keeping its inode; False if there is no such file."""
    data = text.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise from_oserror("open hosts file", str(path), exc) from exc
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    except OSError as exc:
        raise from_oserror("rewrite hosts file", str(path), exc) from exc
    finally:
        os.close(fd)
    return True


def _nameserver_lines(text: str) -> tuple[list[str], list[str]]:
    servers: list[str] = []
    other: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith(("#", ";")):
            continue
        if words[0] == "nameserver" and len(words) > 1:
            try:
                if ipaddress.ip_address(words[1].split("%")[0]).is_loopback:
                    continue  # the host's own resolver is not reachable from a container
            except ValueError:
                continue
            servers.append(words[1])
        elif words[0] in ("search", "domain", "options"):
            other.append(" ".join(words))
    return servers, other


def resolv_text(host_files: Iterable[str] = ("/etc/resolv.conf",
                                             "/run/systemd/resolve/resolv.conf")) -> str:
    """The host's resolv.conf without loopback nameservers. When the first file names only
    loopback ones (a local stub resolver), the next file (systemd-resolved's upstream list)
    is tried."""
    servers: list[str] = []
    other: list[str] = []
    for path in host_files:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        s, o = _nameserver_lines(text)
        other = other or o
        if s:
            servers = s
            break
    lines = ["# written by isobox from the host's resolv.conf (loopback servers left out)"]
    lines += [f"nameserver {s}" for s in servers] + other
    return "\n".join(lines) + "\n"
