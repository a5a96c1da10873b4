"""What issue 6 must show, end to end: a real ``isoboxd``, the CLI, busybox containers.

- a published port of busybox httpd answers ``curl`` from the host (127.0.0.1) and
  another container (parametrised over isolations: ``vm`` joins once it exists);
- two containers on one user network reach each other by name; across networks not even
  by address; ``--network container:ID`` shares the namespace;
- the egress rate limit holds within 20% over 5 s between two containers;
- 100 create/rm cycles leave no veth, no nft rule naming a container, no IPAM row, no
  hosts file; a failed start releases its endpoint; ``kill -9`` of the daemon keeps the
  running containers reachable and releases the endpoints of those that died meanwhile;
- ``network rm`` of a network in use is 409; ports with host isolation are 400 naming the
  field.

Every test removes its containers and networks and checks that nothing of them is left on
the host (links, rules, mounts, cgroups, processes, files).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemonkit import Daemon, assert_nothing_left, short_run_dir
from isobox.client import Client

pytestmark = [pytest.mark.root, pytest.mark.overlay, pytest.mark.cgroup1, pytest.mark.net]

ISOBOX = str(Path(sys.executable).parent / "isobox")
#: vm: the endpoint is a tap on the same bridge, the guest's NIC (tests run one VM at a time).
ISOLATIONS = ["process", pytest.param("vm", marks=[pytest.mark.vm, pytest.mark.slow])]
HTTPD = ("mkdir -p /www && echo hello-from-$(hostname) > /www/index.html && "
         "exec httpd -f -p 80 -h /www")


# --- helpers ----------------------------------------------------------------------------


def cli(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ISOBOX_AUTOSTART="0")
    r = subprocess.run([ISOBOX, *args], capture_output=True, text=True, timeout=timeout,
                       env=env, check=False)
    if check:
        assert r.returncode == 0, f"isobox {' '.join(args)}: {r.returncode}\n{r.stderr}"
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def host_links() -> set[str]:
    return {p.name for p in Path("/sys/class/net").iterdir()
            if p.name.startswith(("ibv", "ibt", "ibx-"))}


def nft_text() -> str:
    out = []
    for family, table in (("inet", "isobox"), ("ip", "isobox_nat")):
        r = subprocess.run(["nft", "list", "table", family, table], capture_output=True,
                           text=True, check=False)
        out.append(r.stdout)
    return "\n".join(out)


def ipam_rows(root: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(root / "state.db")
    try:
        return [(str(a), str(b)) for a, b in
                db.execute("SELECT container_id, ip FROM endpoints").fetchall()]
    except sqlite3.OperationalError:  # no network schema yet
        return []
    finally:
        db.close()


def http_get(url: str, *, timeout: float = 10.0) -> str:
    """curl ``url`` until it answers (the server needs a moment to listen)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        r = subprocess.run(["curl", "-sS", "--max-time", "2", url], capture_output=True,
                           text=True, check=False)
        if r.returncode == 0:
            return r.stdout
        last = r.stderr
        time.sleep(0.1)
    raise AssertionError(f"curl {url}: no answer in {timeout} s: {last}")


def network_of(name: str) -> dict[str, Any]:
    data = json.loads(cli("network", "inspect", name).stdout)
    info: dict[str, Any] = data[0] if isinstance(data, list) else data
    return info


def http_argv(host: str, port: int = 80) -> list[str]:
    """A GET of ``http://host:port/`` with busybox nc (Debian's static busybox wget crashes
    in a root without NSS libraries); prints the body only, fails without an answer."""
    return ["sh", "-c", f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {host} {port} "
            "> /tmp/r && grep -q '^HTTP/1.[01] 200' /tmp/r && sed '1,/^\\r$/d' /tmp/r"]


def wait_http_in(ct: str, host: str, port: int = 80, *, timeout: float = 10.0) -> str:
    """The body of ``http://host:port/`` fetched inside the running container ``ct``, tried
    until it answers."""
    deadline = time.monotonic() + timeout
    r = None
    while time.monotonic() < deadline:
        r = cli("exec", ct, *http_argv(host, port), check=False)
        if r.returncode == 0:
            return r.stdout
        time.sleep(0.1)
    raise AssertionError(f"http://{host}:{port}/ in {ct}: {r.stderr if r else ''}")


def networks_of_daemon(d: Daemon) -> list[tuple[str, str]]:
    """(id, bridge) of every network of the daemon (other tests make their own in
    parallel: the checks below look only at what is named after this test's objects)."""
    return [(n["id"], n["bridge"]) for n in d.request("GET", "/v1/networks").json()]


def assert_no_network_leftovers(root: Path, ids: list[str],
                                networks: list[tuple[str, str]]) -> None:
    """No veth of one of the containers ``ids`` on one of ``networks`` (their names are
    derived from both ids), no nft rule naming a container, no IPAM row of theirs, no
    hosts file (the bridges are checked when the test's networks are removed)."""
    from isobox.network.ipam import veth_name
    from isobox.network.links import tap_name

    veths = {veth_name(c, n) for c in ids for n, _ in networks}
    veths |= {tap_name(v) for v in veths}
    deadline = time.monotonic() + 10
    while True:
        rules = nft_text()
        problems = [f"nft rule of {i[:12]}" for i in ids if i and i in rules]
        problems += [f"veth {x}" for x in sorted(host_links() & veths)]
        problems += [f"IPAM row {r}" for r in ipam_rows(root) if r[0] in ids]
        problems += [f"hosts file of {i[:12]}" for i in ids
                     if (root / "containers" / i / "hosts").exists()]
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not problems, "left behind:\n" + "\n".join(problems)


@pytest.fixture
def daemon(isobox_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    # A short ISOBOX_RUN: a utility VM's agent/QMP sockets must fit in sun_path.
    with short_run_dir() as run:
        monkeypatch.setenv("ISOBOX_RUN", str(run))
        yield from _daemon(isobox_env)


def _daemon(isobox_env: Path) -> Iterator[Daemon]:
    from isobox.storage.bootstrap import bootstrap_busybox
    from isobox.storage.store import ImageStore

    store = ImageStore()
    bootstrap_busybox(store)
    store.close()
    d = Daemon.start(isobox_env, Path(os.environ["ISOBOX_RUN"]))
    ids: list[str] = []
    nets: list[tuple[str, str]] = []
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            nets = networks_of_daemon(d)
            with Client(d.socket_path) as c:
                for ct in c.containers.list(all=True):
                    ids.append(ct.id)
                    ct.remove(force=True)
                for net in c.networks.list():
                    net.remove()
        d.stop()
    assert_nothing_left(isobox_env, d.run, ids)
    assert_no_network_leftovers(isobox_env, ids, nets)
    assert not host_links() & {bridge for _, bridge in nets}, "a bridge is left"
    assert not ipam_rows(isobox_env)


# --- published ports ----------------------------------------------------------------------


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_published_port_answers_curl_from_the_host_and_from_a_container(
        daemon: Daemon, isolation: str) -> None:
    port = free_port()
    cid = cli("run", "-d", "--name", "web", "--isolation", isolation, "-p", f"{port}:80",
              "busybox", "sh", "-c", HTTPD).stdout.strip()
    assert http_get(f"http://127.0.0.1:{port}/") == f"hello-from-{cid[:12]}\n"
    # From another container, through an address of the host (the default gateway).
    gateway = network_of("isobox")["gateway"]
    out = cli("run", "--rm", "busybox", *http_argv(gateway, port)).stdout
    assert out == f"hello-from-{cid[:12]}\n"
    cli("rm", "-f", "web")
    r = subprocess.run(["curl", "-sS", "--max-time", "2", f"http://127.0.0.1:{port}/"],
                       capture_output=True, check=False)
    assert r.returncode != 0  # the rule went with the container


def test_ports_or_rate_with_host_isolation_are_400_naming_the_field(daemon: Daemon) -> None:
    doc = {"schemaVersion": "1.0", "image": "busybox", "isolation": "host",
           "process": {"args": ["true"]},
           "network": {"ports": [{"hostPort": free_port(), "containerPort": 80}]}}
    r = daemon.request("POST", "/v1/compute-systems", json=doc)
    assert r.status == 400, r.text
    assert r.error["field"] == "network.ports"
    doc["network"] = {"rate": 1 << 20}
    r = daemon.request("POST", "/v1/compute-systems", json=doc)
    assert r.status == 400 and r.error["field"] == "network.rate", r.text
    r2 = cli("run", "--rm", "--isolation", "host", "-p", "8000:80", "busybox", "true",
             check=False)
    assert r2.returncode == 125 and "network.ports" in r2.stderr
    # Host isolation runs in the host's network whatever the mode says.
    out = cli("run", "--rm", "--isolation", "host", "busybox", "cat", "/proc/net/dev").stdout
    assert "lo:" in out and any(x in out for x in ("eth", "ens", "enp", "ibx-"))


# --- names and reachability -----------------------------------------------------------


def test_one_network_by_name_two_networks_not_at_all(daemon: Daemon) -> None:
    cli("network", "create", "neta")
    cli("network", "create", "netb")
    web = cli("run", "-d", "--name", "web", "--network", "neta", "--network-alias", "www",
              "busybox", "sh", "-c", HTTPD).stdout.strip()
    peer = cli("run", "-d", "--name", "peer", "--network", "neta", "busybox", "sleep",
               "60").stdout.strip()
    other = cli("run", "-d", "--name", "other", "--network", "netb", "busybox", "sleep",
                "60").stdout.strip()
    hello = f"hello-from-{web[:12]}\n"
    assert wait_http_in("peer", "web") == hello
    assert wait_http_in("peer", "www") == hello
    assert wait_http_in("peer", web[:12]) == hello
    # The hosts file names both members; web's was rewritten in place when peer joined.
    web_hosts = cli("exec", "web", "cat", "/etc/hosts").stdout
    assert "peer" in web_hosts and "web" in web_hosts
    ip_web = network_of("neta")["endpoints"][web]
    assert network_of("netb")["endpoints"] == {other: network_of("netb")["endpoints"][other]}
    # netb cannot resolve web, nor reach it by address.
    r = cli("exec", "other", *http_argv("web"), check=False)
    assert r.returncode != 0
    r = cli("exec", "other", *http_argv(ip_web), check=False)
    assert r.returncode != 0, r.stdout
    assert wait_http_in("peer", ip_web) == hello  # the same address answers on neta
    r = cli("exec", "other", "ping", "-c", "1", "-W", "1", ip_web, check=False)
    assert r.returncode != 0
    # peer leaves: web's hosts file forgets it (same inode, rewritten in place).
    cli("rm", "-f", peer)
    deadline = time.monotonic() + 5
    while "peer" in cli("exec", "web", "cat", "/etc/hosts").stdout:
        assert time.monotonic() < deadline, "web's hosts file still names peer"
        time.sleep(0.1)


def test_network_container_mode_shares_the_namespace(daemon: Daemon) -> None:
    web = cli("run", "-d", "--name", "web", "busybox", "sh", "-c", HTTPD).stdout.strip()
    ip = network_of("isobox")["endpoints"][web]
    deadline = time.monotonic() + 10
    while True:
        r = cli("run", "--rm", "--network", f"container:{web[:12]}", "busybox",
                *http_argv("127.0.0.1"), check=False)
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.stdout == f"hello-from-{web[:12]}\n", r.stderr
    addrs = cli("run", "--rm", "--network", "container:web", "busybox", "ip", "-4", "addr").stdout
    assert ip in addrs
    # Not one more endpoint: the joiner has none of its own.
    assert list(network_of("isobox")["endpoints"]) == [web]


# --- rate limit -------------------------------------------------------------------------


def test_egress_rate_limit_holds_within_20_percent_over_5_s(daemon: Daemon) -> None:
    """A source limited to 1 MiB/s sends zeros as fast as it can to a sink on the same
    network; the sink's file grows by the limit (within 20%) over 5 s of steady transfer,
    measured after the first second (the bucket's burst) by the host's clock."""
    rate = 1 << 20
    cli("network", "create", "ratenet")
    cli("run", "-d", "--name", "sink", "--network", "ratenet", "busybox", "sh", "-c",
        "nc -l -p 5001 -e sh -c 'cat > /tmp/fast' & exec nc -l -p 5000 -e sh -c "
        "'cat > /tmp/data'")
    time.sleep(0.5)
    cli("run", "-d", "--name", "source", "--network", "ratenet", "--network-rate", "1m",
        "busybox", "sh", "-c", "nc sink 5000 < /dev/zero")
    assert "tbf" in cli("exec", "source", "tc", "qdisc", "show", "dev", "eth0").stdout

    def received(name: str = "data") -> tuple[int, float]:
        r = cli("exec", "sink", "stat", "-c", "%s", f"/tmp/{name}")
        return int(r.stdout), time.monotonic()

    time.sleep(1.0)
    n0, t0 = received()
    time.sleep(5.0)
    n1, t1 = received()
    measured = (n1 - n0) / (t1 - t0)
    assert 0.8 * rate <= measured <= 1.2 * rate, (measured, rate)
    # The same pair without a limit is far faster: the limit is what held it.
    cli("rm", "-f", "source")
    cli("run", "-d", "--name", "fast", "--network", "ratenet", "busybox", "sh", "-c",
        "nc sink 5001 < /dev/zero")
    time.sleep(0.5)
    n0, t0 = received("fast")
    time.sleep(1.0)
    n1, t1 = received("fast")
    assert (n1 - n0) / (t1 - t0) > 3 * rate


# --- leaks, failures, crashes -----------------------------------------------------------


def test_no_leak_after_100_create_rm_cycles(daemon: Daemon, isobox_env: Path) -> None:
    cli("network", "create", "cycles")
    ids: list[str] = []
    with Client(daemon.socket_path) as c:
        for i in range(100):
            kw: dict[str, Any] = {"network": "cycles" if i % 2 else "default"}
            if i % 3 == 0:
                kw["ports"] = [f"{free_port()}:80"]
            ct = c.containers.create("busybox", ["true"], **kw)
            ids.append(ct.id)
            ct.start()
            ct.wait()
            ct.remove(force=True)
        assert c.networks.get("cycles").attrs["endpoints"] == {}
        assert c.networks.get("isobox").attrs["endpoints"] == {}
    assert ipam_rows(isobox_env) == []
    assert_nothing_left(isobox_env, daemon.run, ids)
    assert_no_network_leftovers(isobox_env, ids, networks_of_daemon(daemon))


def test_a_failed_start_releases_its_endpoint(daemon: Daemon, isobox_env: Path) -> None:
    port = free_port()
    first = cli("run", "-d", "--name", "first", "-p", f"{port}:80", "busybox", "sleep",
                "60").stdout.strip()
    second = cli("create", "--name", "second", "-p", f"{port}:80", "busybox",
                 "sleep", "60").stdout.strip()
    r = cli("start", "second", check=False)
    assert r.returncode != 0, "a second container published the same host port"
    assert "second" in cli("ps", "-a").stdout
    inspect = json.loads(cli("inspect", "second").stdout)
    inspect = inspect[0] if isinstance(inspect, list) else inspect
    assert inspect["state"] in ("created", "stopped"), inspect
    assert list(network_of("isobox")["endpoints"]) == [first]
    assert [r[0] for r in ipam_rows(isobox_env)] == [first]
    from isobox.network.ipam import veth_name

    nid = network_of("isobox")["id"]
    assert veth_name(first, nid) in host_links()
    assert veth_name(second, nid) not in host_links()
    assert second not in nft_text()
    # An unknown network: refused before anything is made.
    r = cli("run", "--rm", "--network", "nosuchnet", "busybox", "true", check=False)
    assert r.returncode == 125 and "nosuchnet" in r.stderr
    cli("rm", "-f", first, second)
    assert_no_network_leftovers(isobox_env, [first, second], networks_of_daemon(daemon))


def test_daemon_kill9_keeps_running_containers_reachable_and_frees_the_dead(
        daemon: Daemon, isobox_env: Path) -> None:
    port, late_port = free_port(), free_port()
    web = cli("run", "-d", "--name", "web", "-p", f"{port}:80", "busybox", "sh", "-c",
              HTTPD).stdout.strip()
    late = cli("run", "-d", "--name", "late", "-p", f"{late_port}:80", "busybox", "sh",
               "-c", "sleep 1.5").stdout.strip()
    assert http_get(f"http://127.0.0.1:{port}/") == f"hello-from-{web[:12]}\n"
    assert late in nft_text()
    daemon.kill9()
    time.sleep(2.5)  # "late" ends while no daemon runs
    daemon.launch()
    assert http_get(f"http://127.0.0.1:{port}/") == f"hello-from-{web[:12]}\n"
    eps = network_of("isobox")["endpoints"]
    assert list(eps) == [web], eps
    assert late not in nft_text() and web in nft_text()
    assert [r[0] for r in ipam_rows(isobox_env)] == [web]
    cli("rm", "-f", web, late)
    assert_no_network_leftovers(isobox_env, [web, late], networks_of_daemon(daemon))


# --- the network verbs ------------------------------------------------------------------


def test_network_verbs_and_rm_of_a_network_in_use_is_409(daemon: Daemon) -> None:
    nid = cli("network", "create", "--subnet", "10.231.7.0/24", "--internal",
              "mine").stdout.strip()
    assert len(nid) == 64
    ls = cli("network", "ls").stdout
    assert "mine" in ls and "10.231.7.0/24" in ls
    info = network_of("mine")
    assert info["internal"] is True and info["gateway"] == "10.231.7.1"
    assert cli("network", "create", "mine", check=False).returncode != 0
    r = daemon.request("POST", "/v1/networks", json={"name": "none"})
    assert r.status == 400 and r.error["field"] == "name", r.text
    cid = cli("run", "-d", "--network", "mine", "busybox", "sleep", "60").stdout.strip()
    assert network_of(nid[:12])["endpoints"][cid].startswith("10.231.7.")
    r = daemon.request("DELETE", "/v1/networks/mine")
    assert r.status == 409, r.text
    r2 = cli("network", "rm", "mine", check=False)
    assert r2.returncode != 0 and "endpoint" in r2.stderr
    # internal: no route out of the host, but the gateway answers.
    out = cli("exec", cid, "ip", "route").stdout
    assert "default via 10.231.7.1" in out
    cli("rm", "-f", cid)
    assert cli("network", "rm", "mine").stdout.strip() == "mine"
    assert daemon.request("GET", "/v1/networks/mine").status == 404
    with contextlib.suppress(Exception):
        cli("network", "rm", "mine", check=False)
