"""Review of issue 6 (networking) through a real ``isoboxd`` and busybox containers: the
defects of tests/test_review_network_service.py that a real container (not a stand-in
namespace) can exploit, and bad input through the API."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import test_network_e2e as e2e
from daemonkit import Daemon
from test_network_e2e import cli, network_of
from test_review_network_service import got, in_netns, mac_of, send_raw, udp_frame

pytestmark = [pytest.mark.root, pytest.mark.overlay, pytest.mark.cgroup1, pytest.mark.net]

CAP_NET_RAW = 13

daemon = e2e.daemon  # the fixture: a real isoboxd whose networks are checked gone after


def _pid(d: Daemon, ref: str) -> int:
    r = d.request("GET", f"/v1/compute-systems/{ref}")
    assert r.status == 200, r.text
    return int(r.json()["pid"])


def test_a_real_container_reaches_the_hosts_loopback_services(daemon: Daemon) -> None:
    """A busybox container on the default network has CAP_NET_RAW (isobox's default set),
    so it can send a frame to the gateway's MAC with destination 127.0.0.1; with
    ``route_localnet=1`` on the bridge the host delivers it to a service bound to loopback
    only. The frame is sent from the container's own network namespace, on its eth0, with
    its address: nothing a container process cannot do."""
    cid = cli("run", "-d", "--name", "rvraw", "busybox", "sleep", "60").stdout.strip()
    pid = _pid(daemon, cid)
    status = Path(f"/proc/{pid}/status").read_text()
    cap_eff = int(next(line.split()[1] for line in status.splitlines()
                       if line.startswith("CapEff:")), 16)
    assert cap_eff & (1 << CAP_NET_RAW), "precondition: containers have CAP_NET_RAW"
    net = network_of("isobox")
    ip, gw = net["endpoints"][cid], net["gateway"]
    netns = f"/proc/{pid}/ns/net"
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(1.5)
    port = listener.getsockname()[1]
    gw_listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gw_listener.bind((gw, port))
    gw_listener.settimeout(1.5)
    try:
        ctr_mac = in_netns(netns, lambda: Path("/sys/class/net/eth0/address").read_text().strip())
        gw_mac = mac_of(net["bridge"])
        send_raw(netns, "eth0", udp_frame((ctr_mac, ip), (gw_mac, gw), 40000, port, b"gw"))
        assert got(gw_listener) == b"gw", "harness: the container's frames get nowhere"
        send_raw(netns, "eth0", udp_frame((ctr_mac, ip), (gw_mac, "127.0.0.1"), 40001,
                                          port, b"lo"))
        assert got(listener) is None, f"container {cid[:12]} reached 127.0.0.1:{port}"
    finally:
        listener.close()
        gw_listener.close()
        cli("rm", "-f", cid)


def test_api_refuses_a_multicast_subnet_with_400_and_makes_nothing(daemon: Daemon) -> None:
    """POST /v1/networks with ``subnet: 224.1.0.0/24`` is 201 today: a bridge with a
    multicast gateway. It should be a 400 naming ``subnet``, with no network made."""
    r = daemon.request("POST", "/v1/networks", json={"name": "rvmcast",
                                                     "subnet": "224.1.0.0/24"})
    made = daemon.request("GET", "/v1/networks/rvmcast").status
    if r.status == 201:
        daemon.request("DELETE", "/v1/networks/rvmcast")
    assert r.status == 400, r.text
    assert r.error.get("field") == "subnet", r.text
    assert made == 404
