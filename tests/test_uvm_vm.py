"""Launching utility VMs: the QEMU command line, a real TCG boot, QMP, the agent channel,
kill -9 from outside, the accelerator probe and the ext4 scratch disk.

The guest side here is not the isobox agent: the image's ``isobox.cmd=<base64>`` hook runs
a few lines of busybox shell that open the agent port, say ``ready <nproc> <MemTotal kB>``
and then run each line the host sends, answering with its output and an ``__end <rc>``
line. That shows the channel end to end without depending on the agent's protocol.
Only one QEMU runs at a time (2 cores); every test checks nothing is left behind.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from isobox.errors import InvalidArgument, IsoboxError, VmError
from isobox.uvm import accel
from isobox.uvm.scratch import create_scratch, release_scratch
from isobox.uvm.vm import Disk, Share, UtilityVM, VmConfig

# The guest side of these tests (busybox sh, run by stage 2 instead of the agent).
GUEST_SHELL = r"""
for d in /sys/class/virtio-ports/*; do [ "$(cat $d/name)" = agent ] && p=/dev/${d##*/}; done
exec 3<>$p
echo "ready $(nproc) $(awk '/MemTotal/{print $2}' /proc/meminfo)" >&3
while read -r line <&3; do sh -c "$line" >&3 2>&1 </dev/null; echo "__end $?" >&3; done
"""


def shell_cmdline() -> str:
    return "isobox.cmd=" + base64.b64encode(GUEST_SHELL.encode()).decode()


@pytest.fixture(scope="module")
def assets() -> Any:
    """The utility-VM assets, shared by every test ($ISOBOX_UVM_DIR, which conftest.py
    points at one cache outside the per-test roots; the vm probe built them)."""
    from isobox.uvm.assets import ensure_assets

    return ensure_assets()


class GuestShell:
    """The host end of GUEST_SHELL over the VM's agent socket."""

    def __init__(self, vm: UtilityVM) -> None:
        assert vm.agent is not None
        self.sock = vm.agent
        self.buf = b""

    def line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError(f"no line from the guest in {timeout} s ({self.buf!r})")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"agent channel closed ({self.buf!r})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def run(self, cmd: str, timeout: float = 30.0) -> tuple[int, str]:
        self.sock.sendall(cmd.encode() + b"\n")
        out = []
        while True:
            ln = self.line(timeout)
            if ln.startswith("__end "):
                return int(ln.split()[1]), "\n".join(out)
            out.append(ln)


def qemu_pids() -> set[int]:
    """Live QEMU processes this test process started (other engineers' and other test
    runs' VMs on the machine are not ours to count or kill)."""
    pids = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                comm = (p / "comm").read_text().strip()
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if comm.startswith("qemu-system") and fields[0] != "Z" \
                    and int(fields[1]) == os.getpid():
                pids.add(int(p.name))
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture
def no_leftovers(isobox_env: Path) -> Iterator[Path]:
    """After the test: no uvm folder under ISOBOX_RUN, no QEMU this test started."""
    run = Path(os.environ["ISOBOX_RUN"])
    before = qemu_pids()
    yield run
    left = qemu_pids() - before
    for pid in left:  # never leave one running, even when the test failed
        os.kill(pid, signal.SIGKILL)
    assert not left, f"QEMU processes left running: {left}"
    assert not (run / "uvm").exists() or not any((run / "uvm").iterdir())


# -- no VM needed ---------------------------------------------------------------------------


class FakeAssets:
    kernel = Path("/k/vmlinux")
    initrd = Path("/k/initrd.cpio")
    image = Path("/k/uvm,1.erofs")
    cmdline_base = "console=ttyS0 quiet"


def _opts_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_argv_follows_the_config(tmp_path: Path) -> None:
    cfg = VmConfig(memory_mib=384, cpus=2, cmdline="isobox.x=1",
                   disks=[Disk(tmp_path / "scratch.ext4", "scratch", False),
                          (tmp_path / "l0.erofs", "layer0", True)],  # type: ignore[list-item]
                   shares=[Share("share0", tmp_path / "a,b", True)], tap="ibxtap0")
    argv = UtilityVM("t1", FakeAssets(), cfg, accel="tcg").argv()
    assert argv[argv.index("-m") + 1] == "384"
    assert argv[argv.index("-smp") + 1] == "2"
    assert argv[argv.index("-append") + 1] == "console=ttyS0 quiet isobox.x=1"
    assert "-no-reboot" in argv  # a guest panic (panic=-1) ends QEMU
    assert argv[argv.index("-accel") + 1].startswith("tcg")
    drives = _opts_after(argv, "-drive")
    assert "file=/k/uvm,,1.erofs" in drives[0] and "readonly=on" in drives[0]  # commas doubled
    assert "readonly=on" not in drives[1] and "cache=writeback" in drives[1]
    assert "readonly=on" in drives[2]
    devices = _opts_after(argv, "-device")
    assert [d for d in devices if d.startswith("virtio-blk-device")] == [
        "virtio-blk-device,drive=img,serial=uvm",
        "virtio-blk-device,drive=disk0,serial=scratch",
        "virtio-blk-device,drive=disk1,serial=layer0"]
    fsdev = _opts_after(argv, "-fsdev")
    assert fsdev == [f"local,id=fs0,path={tmp_path}/a,,b,security_model=none,readonly=on"]
    assert "virtio-9p-device,fsdev=fs0,mount_tag=share0" in devices
    assert _opts_after(argv, "-netdev") == ["tap,id=net0,ifname=ibxtap0,script=no,downscript=no"]
    chardevs = _opts_after(argv, "-chardev")
    agent = next(c for c in chardevs if c.startswith("socket"))
    assert agent.endswith(",server=off")  # QEMU connects; the engine listens


def test_config_is_validated() -> None:
    for bad in (VmConfig(memory_mib=16), VmConfig(cpus=0),
                VmConfig(disks=[Disk(Path("/x"), "uvm")]),
                VmConfig(disks=[Disk(Path("/x"), "a"), Disk(Path("/y"), "a")]),
                VmConfig(disks=[Disk(Path("/x"), "x" * 21)]),
                VmConfig(shares=[Share("a b", Path("/x"))]),
                VmConfig(tap="bad,tap")):
        with pytest.raises(InvalidArgument):
            UtilityVM("v", FakeAssets(), bad, accel="tcg")
    with pytest.raises(InvalidArgument):
        UtilityVM("../x", FakeAssets(), VmConfig(), accel="tcg")


def test_scratch_disk_is_sparse_ext4_and_released(tmp_path: Path) -> None:
    path = tmp_path / "scratch.ext4"
    disk = create_scratch(path, 64 * 1024 * 1024)
    assert path.stat().st_size == 64 * 1024 * 1024
    assert disk.allocated() < 4 * 1024 * 1024  # sparse: metadata only
    with open(path, "rb") as fh:
        fh.seek(1024 + 56)
        assert fh.read(2) == b"\x53\xef"  # the ext2/3/4 superblock magic
    out = subprocess.run(["dumpe2fs", "-h", str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert "has_journal" in out and "extent" in out  # ext4, not ext2
    with pytest.raises(IsoboxError):
        create_scratch(path)  # never reuses a file silently
    assert path.exists()
    disk.release()
    assert not path.exists()
    release_scratch(path)  # idempotent


def test_scratch_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidArgument):
        create_scratch(tmp_path / "s", 1000)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mkfs.ext4").write_text("#!/bin/sh\necho broken >&2\nexit 1\n")
    (fake / "mkfs.ext4").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    with pytest.raises(IsoboxError, match="broken"):
        create_scratch(tmp_path / "s")
    assert not (tmp_path / "s").exists()


# -- the accelerator probe ------------------------------------------------------------------


@pytest.mark.vm
def test_accel_probe_boots_and_is_cached(assets: Any, isobox_env: Path) -> None:
    result = accel.probe(assets=assets)
    assert result.name in ("kvm", "tcg") and not result.cached
    if result.name == "tcg":
        # Here /dev/kvm opens but a guest cannot run on it: the reason must say so.
        assert "KVM" in result.reason, result.reason
    doc = json.loads((isobox_env / "uvm" / "accel.json").read_text())
    assert doc["name"] == result.name and doc["reason"] == result.reason
    assert "QEMU" in doc["qemu_version"] and doc["key"]["guest_kernel"].startswith(
        str(Path(assets.kernel).resolve()))
    t = time.monotonic()
    again = accel.probe(assets=assets)
    took = time.monotonic() - t
    assert again.cached and (again.name, again.reason) == (result.name, result.reason)
    assert took < 0.05, f"a cached probe took {took:.3f} s"
    assert accel.cached_result(assets) == again
    forced = accel.probe(force=True, assets=assets)
    assert not forced.cached and forced.name == result.name


@pytest.mark.vm
def test_accel_probe_without_kvm_device(assets: Any, isobox_env: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "KVM_DEVICE", "/dev/no-such-kvm")
    result = accel.probe(assets=assets)
    assert result.name == "tcg" and "/dev/no-such-kvm" in result.reason


@pytest.mark.vm
def test_accel_cache_is_keyed_by_the_guest_kernel(assets: Any, isobox_env: Path,
                                                  tmp_path: Path) -> None:
    accel.probe(assets=assets)
    assert accel.cached_result(assets) is not None

    class Other:
        kernel = tmp_path / "vmlinux"
        initrd = assets.initrd
        cmdline_base = assets.cmdline_base

    shutil.copyfile(assets.kernel, Other.kernel)  # same bytes, another file
    assert accel.cached_result(Other()) is None  # another kernel: probe again


# -- real VMs (TCG here) --------------------------------------------------------------------


@pytest.mark.vm
@pytest.mark.slow
def test_boot_channel_qmp_pause_resume_quit(assets: Any, no_leftovers: Path,
                                            tmp_path: Path) -> None:
    scratch = create_scratch(tmp_path / "scratch.ext4")
    layer = tmp_path / "layer0.raw"
    layer.write_bytes(b"\0" * 1024 * 1024)
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("hello from the host\n")
    cfg = VmConfig(memory_mib=320, cpus=2, cmdline=shell_cmdline(),
                   disks=[Disk(scratch.path, "scratch", readonly=False),
                          Disk(layer, "layer0", readonly=True)],
                   shares=[Share("share0", share, readonly=True)])
    with UtilityVM("boot1", assets, cfg, accel="tcg") as vm:
        connected = vm.start()
        assert connected < 5.0  # QEMU connects at its start, long before the guest boots
        assert alive(vm.pid) and os.getpgid(vm.pid) == vm.pid  # its own process group
        run_dir = vm.run_dir
        assert {p.name for p in run_dir.iterdir()} == {"agent.sock", "qmp.sock", "console.log",
                                                       "qemu.pid"}
        assert int((run_dir / "qemu.pid").read_text()) == vm.pid
        sh = GuestShell(vm)
        ready = sh.line(120).split()
        assert ready[0] == "ready"
        assert vm.wait_port_open(5) > connected  # QMP saw the guest open its port
        # VM memory and vCPUs follow the config, seen from the guest and from QEMU.
        assert int(ready[1]) == 2
        assert 0.7 * 320 * 1024 < int(ready[2]) <= 320 * 1024
        assert vm.qmp("query-memory-size-summary")["base-memory"] == 320 * 1024 * 1024
        assert len(vm.qmp("query-cpus-fast")) == 2
        assert vm.status() == "running"
        # Disks by serial (read-only where asked); the 9p share, read-only.
        rc, out = sh.run("for b in /sys/block/vd*; do echo $(cat $b/serial) $(cat $b/ro); done")
        assert rc == 0 and set(out.split("\n")) == {"uvm 1", "scratch 0", "layer0 1"}
        rc, out = sh.run("mkdir -p /tmp/s && mount -t 9p -o trans=virtio,version=9p2000.L "
                         "share0 /tmp/s && cat /tmp/s/hello.txt && ! touch /tmp/s/x")
        assert rc == 0 and out.split("\n") == ["hello from the host",
                                                "touch: /tmp/s/x: Read-only file system"]
        assert not (share / "x").exists()
        rc, _ = sh.run("echo kept > /scratch/kept.txt && sync")  # stage 2 mounted it
        assert rc == 0
        # stop/cont: a paused guest answers nothing; after cont it answers.
        vm.pause()
        assert vm.status() == "paused"
        sh.sock.sendall(b"echo after-pause\n")
        with pytest.raises(TimeoutError):
            sh.line(1.5)
        vm.resume()
        assert vm.status() == "running"
        assert sh.line(30) == "after-pause" and sh.line(30) == "__end 0"
        pid = vm.pid
        info = vm.quit()
        assert info.returncode == 0 and info.requested and not info.failed
        assert info.shutdown == "host-qmp-quit"
        assert not alive(pid)
        assert not run_dir.exists()
        assert vm.agent is None and not vm.running
        with pytest.raises(VmError):
            vm.status()
    # The scratch disk outlives the VM with what the guest wrote (writeback honoured sync);
    # the guest never unmounted it, so replay its journal first, as the next mount would.
    fsck = subprocess.run(["e2fsck", "-fp", str(scratch.path)], capture_output=True, check=False)
    assert fsck.returncode in (0, 1), fsck.stderr
    out = subprocess.run(["debugfs", "-R", "cat /kept.txt", str(scratch.path)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "kept"
    scratch.release()


@pytest.mark.vm
@pytest.mark.slow
def test_kill_9_of_qemu_is_detected_and_cleaned(assets: Any, no_leftovers: Path) -> None:
    vm = UtilityVM("kill1", assets, VmConfig(memory_mib=256, cmdline=shell_cmdline()),
                   accel="tcg")
    seen: list[Any] = []
    done = threading.Event()
    vm.on_exit(lambda info: (seen.append(info), done.set()))
    try:
        vm.start()
        GuestShell(vm).line(120)
        run_dir = vm.run_dir
        os.kill(vm.pid, signal.SIGKILL)  # from outside, as an admin or the OOM killer would
        assert done.wait(10), "the VM's death went unnoticed"
        info = seen[0]
        assert info.returncode == -signal.SIGKILL and info.failed and not info.requested
        assert "SIGKILL" in info.reason
        assert not vm.running and vm.exit_info == info
        assert not run_dir.exists()  # sockets, console log and folder gone
        with pytest.raises(VmError, match="SIGKILL"):
            vm.qmp("query-status")
        late: list[Any] = []
        vm.on_exit(late.append)  # registered after the death: called at once
        assert late == [info]
    finally:
        vm.close()


@pytest.mark.vm
@pytest.mark.slow
@pytest.mark.parametrize(("guest", "shutdown", "failed"), [
    ("echo bye", "guest-shutdown", False),             # stage 2 powers off after isobox.cmd
    ("echo c > /proc/sysrq-trigger", "guest-reset", True),  # a panic: panic=-1, -no-reboot
])
def test_guest_ending_by_itself(assets: Any, no_leftovers: Path, guest: str, shutdown: str,
                                failed: bool) -> None:
    cmd = "isobox.cmd=" + base64.b64encode(guest.encode()).decode()
    with UtilityVM("end1", assets, VmConfig(memory_mib=256, cmdline=cmd), accel="tcg") as vm:
        vm.start()
        info = vm.wait(120)
        assert info.returncode == 0 and not info.requested
        assert (info.shutdown, info.failed) == (shutdown, failed), info
        assert not vm.run_dir.exists()
        if not failed:
            assert "bye" in info.console_tail


@pytest.mark.vm
def test_qemu_that_cannot_start_is_reported_and_leaves_nothing(assets: Any,
                                                               no_leftovers: Path,
                                                               tmp_path: Path) -> None:
    cfg = VmConfig(disks=[Disk(tmp_path / "missing.img", "layer0")])
    vm = UtilityVM("bad1", assets, cfg, accel="tcg")
    with pytest.raises(VmError, match=r"missing\.img"):
        vm.start()
    assert vm.exit_info is not None and vm.exit_info.returncode == 1
    assert not vm.run_dir.exists()
    vm.close()


@pytest.mark.vm
def test_run_folder_and_socket_conflicts(assets: Any, no_leftovers: Path) -> None:
    vm = UtilityVM("dup1", assets, VmConfig(), accel="tcg")
    vm.run_dir.mkdir(parents=True)
    try:
        with pytest.raises(IsoboxError, match="exists"):
            vm.start()
        assert vm.run_dir.exists()  # not ours: left alone
    finally:
        vm.run_dir.rmdir()


def test_start_timeout_kills_qemu(no_leftovers: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU that never connects the agent socket (here: a stand-in that only sleeps) is
    killed at the deadline and nothing is left."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "qemu-system-x86_64").write_text("#!/bin/sh\nexec sleep 60\n")
    (fake / "qemu-system-x86_64").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    vm = UtilityVM("slow1", FakeAssets(), VmConfig(), accel="tcg")
    t = time.monotonic()
    with pytest.raises(IsoboxError, match="did not connect"):
        vm.start(timeout=1.0)
    assert time.monotonic() - t < 5
    assert vm.exit_info is not None and vm.exit_info.returncode == -signal.SIGKILL
    assert not alive(vm.pid) and not vm.run_dir.exists()

