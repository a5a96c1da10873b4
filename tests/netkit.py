"""Test helpers for isobox.network: stand-in "containers" (a process in its own network
namespace), TCP servers and clients run inside them, and snapshots of what networking left
on the host."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# A TCP server: answers each connection with the peer's address, then echoes what it gets.
SERVER = r"""
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
print("ready", flush=True)
def serve(c, peer):
    c.sendall((peer[0] + "\n").encode())
    while True:
        d = c.recv(65536)
        if not d: break
        c.sendall(d)
    c.close()
while True:
    c, peer = s.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"""

# A TCP client: prints what the server said first (the address it saw) and the echo.
CLIENT = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    f = c.makefile("rb")
    peer = f.readline().decode().strip()
    c.sendall(b"ping\n")
    echo = f.readline().decode().strip()
    print(peer, echo)
except OSError as exc:
    print("ERR", exc)
"""

# A sink: counts the bytes of one connection, prints bytes and seconds first→last byte.
SINK = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
n = 0; first = last = None
while True:
    d = c.recv(1 << 16)
    if not d: break
    now = time.monotonic()
    if first is None: first = now
    last = now; n += len(d)
print(n, (last or 0) - (first or 0), flush=True)
"""

# A source: sends as fast as it can for argv[3] seconds.
SOURCE = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
buf = b"x" * 65536; end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    c.send(buf)
c.close()
"""


class Netns:
    """A process alone in a new network namespace: what a container is to the network."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["unshare", "--net", "sleep", "1000"])
        mine = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while True:
            try:
                if os.readlink(f"/proc/{self.proc.pid}/ns/net") != mine:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("unshare --net did not start")
            time.sleep(0.005)
        self.path = f"/proc/{self.proc.pid}/ns/net"
        self.children: list[subprocess.Popen[str]] = []

    def argv(self, *args: str) -> list[str]:
        return ["nsenter", f"--net={self.path}", *args]

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True,
                              timeout=timeout, check=False)

    def ping(self, ip: str) -> bool:
        return self.run("busybox", "ping", "-c", "1", "-W", "1", ip).returncode == 0

    def python(self, code: str, *args: str, timeout: float = 30) -> str:
        proc = self.run(sys.executable, "-c", code, *args, timeout=timeout)
        return proc.stdout.strip()

    def serve(self, code: str, *args: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(self.argv(sys.executable, "-c", code, *args),
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        self.children.append(p)
        return p

    def connect(self, ip: str, port: int, timeout: float = 3) -> str:
        return self.python(CLIENT, ip, str(port), str(timeout))

    def close(self) -> None:
        for p in [*self.children, self.proc]:
            p.kill()
            p.wait()


def connect(ip: str, port: int, timeout: float = 3) -> str:
    """The CLIENT, from the host's own network namespace."""
    proc = subprocess.run([sys.executable, "-c", CLIENT, ip, str(port), str(timeout)],
                          capture_output=True, text=True, timeout=30, check=False)
    return proc.stdout.strip()


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


def nft_json(family: str, table: str) -> str | None:
    proc = subprocess.run(["nft", "-j", "list", "table", family, table], capture_output=True,
                          text=True, check=False, timeout=30)
    return proc.stdout if proc.returncode == 0 else None


def host_state(owners: set[str], names: set[str]) -> dict[str, Any]:
    """What isobox networking has on the host that belongs to ``owners`` (rule comments) and
    to the links ``names`` (other isobox roots may work on the same host meanwhile)."""
    from isobox.network import links, nft

    return {
        "links": [n for n in links.link_names("ib") if n in names],
        "addresses": sorted(a for a in links.addresses() if a[0] in names),
        "rules": sorted((r.chain, r.comment) for r in nft.rules() if r.comment in owners),
    }


def write_hosts(root: Path, cid: str, text: str) -> Path:
    p = root / "containers" / cid / "hosts"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p
