"""Podman, containerd and dockerd run busybox containers on ``isobox-runtime``.

Each engine drives the runtime exactly as it drives runc (its own command line, state JSON,
pid files, console sockets, hooks and mounts); the tests check what the user of the engine
sees — output, exit codes, stdin, a terminal, ``exec`` — and, once the engine removed the
container, that nothing of it is left: no state under the runtime's root, no cgroup with
the container's ID in any hierarchy. Where the output depends on the runtime (a terminal),
the same command run with ``runc`` is the reference.

Isolation follows tests/test_interop_engines.py (see its docstring and
/work/shared/notes/peers.md); on top of it:

* podman runs in a private mount namespace with folders of the test bound over ``/var/lib``,
  ``/var/tmp`` and ``/run``. Podman names no ``--root`` for a runtime it does not know, so
  isobox-runtime keeps its state in its default ``/run/isobox-runtime`` — the test's
  ``host-run/isobox-runtime``. (``--runtime-flag root=…`` is no way out: podman 4.3's
  ``container cleanup``, which conmon starts when the container exits and which deletes it,
  drops runtime flags and so deletes from the default root.)
* containerd (one per module, started by a fixture) has root, state, sockets and its ``opt``
  folder under a temporary folder, and runs in a private mount namespace with folders of the
  test over ``/run`` and ``/opt``: its shims put their sockets in ``/run/containerd/s`` and
  the runtime's root is ``/run/containerd/runc/<namespace>`` whatever the config says.
  ``ctr`` runs on the host with ``--fifo-dir`` in the test's folder.
* dockerd as in test_interop_engines, with a ``runtimes`` entry naming isobox-runtime. It
  hands every runtime runc's root, ``<exec-root>/runtime-runc/moby``.

Daemons are stopped at teardown (SIGTERM, then SIGKILL), and the teardown checks that no
process and no mount of them is left.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require_tool
from test_interop_engines import (
    DOCKER_CLI,
    Docker,
    _log_tail,
    assert_no_leftovers,
    podman_env,
    private_mounts,
    run,
    running_dockerd,
)

pytestmark = [pytest.mark.root, pytest.mark.tools, pytest.mark.cgroup1,
              pytest.mark.timeout(180)]

RUNTIME = Path(sys.executable).parent / "isobox-runtime"
IMAGE = "busybox:latest"
DAEMON_START_TIMEOUT = 30.0
DAEMON_STOP_TIMEOUT = 20.0
GONE_TIMEOUT = 10.0  # for an engine to finish removing a container after its CLI returned


# ---- helpers ------------------------------------------------------------------------------


def timed(label: str, fn: Callable[[], subprocess.CompletedProcess[str]]
          ) -> subprocess.CompletedProcess[str]:
    start = time.monotonic()
    out = fn()
    sys.stderr.write(f"\n{label}: {time.monotonic() - start:.2f} s")
    return out


def run_input(argv: list[str], data: str, *, env: dict[str, str] | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``argv`` with ``data`` piped to its stdin."""
    return subprocess.run(argv, input=data, capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def run_in_pty(argv: list[str], *, env: dict[str, str] | None = None,
               timeout: float = 60) -> tuple[int, bytes]:
    """``argv`` with a new pseudo-terminal as its controlling terminal and stdio, as a user
    at a terminal would run it: its exit code and everything it wrote to the terminal."""
    pid, master = pty.fork()
    if pid == 0:  # the child: exec at once, nothing else
        try:
            os.execvpe(argv[0], argv, env if env is not None else os.environ)
        finally:
            os._exit(127)
    out = b""
    status: int | None = None
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: no process holds the terminal any more
                    chunk = b""
                if chunk:
                    out += chunk
                    continue
            if status is not None:
                break  # it exited and everything it wrote has been read
            got, st = os.waitpid(pid, os.WNOHANG)
            if got:
                status = st
                continue  # read what is left
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"{' '.join(argv)} still running after {timeout:.0f} s: {out!r}")
            if ready:
                time.sleep(0.05)  # end of file, but it has not exited yet
    finally:
        os.close(master)
    return os.waitstatus_to_exitcode(status), out


def cgroup_leftovers(cid: str) -> list[str]:
    """Every cgroup folder, in any hierarchy, whose name holds the container's ID
    (``/default/<id>`` of containerd, ``/libpod_parent/libpod-<id>``, ``/docker/<id>``)."""
    found = []
    for hierarchy in os.listdir("/sys/fs/cgroup"):
        for dirpath, dirs, _files in os.walk(Path("/sys/fs/cgroup", hierarchy)):
            found += [os.path.join(dirpath, d) for d in dirs if cid in d]
    return found


def state_left(root: Path) -> list[str]:
    try:
        return sorted(os.listdir(root))
    except FileNotFoundError:
        return []


def assert_gone(cid: str, runtime_root: Path) -> None:
    """Nothing of the container left: no isobox state under the runtime's root, no cgroup.
    The engine may finish removing the container just after its CLI returned: wait a
    little."""
    deadline = time.monotonic() + GONE_TIMEOUT
    while time.monotonic() < deadline:
        if not state_left(runtime_root) and not cgroup_leftovers(cid):
            return
        time.sleep(0.05)
    assert state_left(runtime_root) == [], f"state left under {runtime_root}"
    assert cgroup_leftovers(cid) == [], "cgroups left"


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(DAEMON_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def busybox_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox bootstrapped into a store of its own, saved as a docker archive (which
    podman, ctr and docker all load)."""
    assert RUNTIME.is_file(), f"{RUNTIME} missing (pip install -e . makes it)"
    folder = tmp_path_factory.mktemp("busybox")
    env = {**os.environ, "ISOBOX_ROOT": str(folder / "root"), "ISOBOX_RUN": str(folder / "run")}
    cli = [sys.executable, "-m", "isobox.cli.main"]
    run([*cli, "image", "bootstrap", "busybox"], env=env)
    archive = folder / "busybox.docker.tar"
    run([*cli, "save", IMAGE, "-o", str(archive), "--format", "docker"], env=env)
    return archive


# ---- podman -------------------------------------------------------------------------------


@dataclass
class Podman:
    root: Path
    env: dict[str, str]

    @property
    def runtime_root(self) -> Path:
        return self.root / "host-run" / "isobox-runtime"  # /run/isobox-runtime, for podman

    def argv(self, *args: str) -> list[str]:
        return private_mounts(
            {"/var/lib": self.root / "var-lib", "/var/tmp": self.root / "var-tmp",
             "/run": self.root / "host-run"},
            ["podman", *args],
        )

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(self.argv(*args), env=self.env, check=check)

    def isobox(self, *args: str) -> list[str]:
        """``podman --runtime isobox-runtime run --rm --network none <args>``."""
        return self.argv("--runtime", str(RUNTIME), "run", "--rm", "--network", "none", *args)


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path) -> Iterator[Podman]:
    require_tool("podman")
    require_tool("conmon")
    require_tool("runc")  # the reference
    root = tmp_path_factory.mktemp("podman")
    env = podman_env(root, runtime="runc")
    p = Podman(root, env)
    p("load", "-i", str(busybox_archive))
    try:
        yield p
    finally:
        p("rm", "--all", "--force", "--time", "0", check=False)
        assert state_left(p.runtime_root) == [], "isobox state left after podman rm --all"
        assert_no_leftovers(root, "podman")


def test_podman_run_output_and_exit_code(podman: Podman, tmp_path: Path) -> None:
    cidfile = tmp_path / "cid"
    out = timed("podman run --rm (isobox-runtime)",
                lambda: run(podman.isobox("--cidfile", str(cidfile), IMAGE, "echo", "hi"),
                            env=podman.env, check=False))
    assert (out.returncode, out.stdout) == (0, "hi\n"), out.stderr
    assert_gone(cidfile.read_text().strip(), podman.runtime_root)
    timed("podman run --rm (runc)",
          lambda: podman("--runtime", "runc", "run", "--rm", "--network", "none", IMAGE,
                         "true"))

    cidfile.unlink()
    failed = run(podman.isobox("--cidfile", str(cidfile), IMAGE, "sh", "-c", "exit 3"),
                 env=podman.env, check=False)
    assert failed.returncode == 3, failed.stderr
    assert_gone(cidfile.read_text().strip(), podman.runtime_root)

    # Not root: conmon's pipes (root's, mode 0600) are given to the user, as runc does.
    user = run(podman.isobox("-u", "1000:1000", IMAGE, "sh", "-c",
                             "echo out > /dev/stdout; echo err > /dev/stderr"),
               env=podman.env, check=False)
    assert (user.returncode, user.stdout, user.stderr) == (0, "out\n", "err\n")


def test_podman_run_interactive_stdin(podman: Podman, tmp_path: Path) -> None:
    cidfile = tmp_path / "cid"
    out = run_input(podman.isobox("-i", "--cidfile", str(cidfile), IMAGE, "cat"),
                    "line one\nline two\n", env=podman.env)
    assert (out.returncode, out.stdout) == (0, "line one\nline two\n"), out.stderr
    assert_gone(cidfile.read_text().strip(), podman.runtime_root)


def test_podman_run_tty_as_runc(podman: Podman, tmp_path: Path) -> None:
    script = "echo hi; tty; [ -t 0 ] && [ -t 1 ] && echo both-ttys; exit 4"
    cidfile = tmp_path / "cid"
    ours = run_in_pty(podman.isobox("-t", "--cidfile", str(cidfile), IMAGE, "sh", "-c", script),
                      env=podman.env)
    theirs = run_in_pty(
        podman.argv("--runtime", "runc", "run", "--rm", "--network", "none", "-t", IMAGE,
                    "sh", "-c", script),
        env=podman.env)
    assert ours == theirs
    assert ours == (4, b"hi\r\n/dev/pts/0\r\nboth-ttys\r\n")
    assert_gone(cidfile.read_text().strip(), podman.runtime_root)


def test_podman_exec(podman: Podman) -> None:
    name = "isobox-exec"
    cid = podman("--runtime", str(RUNTIME), "run", "-d", "--name", name, "--network", "none",
                 IMAGE, "sleep", "100").stdout.strip()
    try:
        out = timed("podman exec (isobox-runtime)",
                    lambda: podman("exec", name, "echo", "hi", check=False))
        assert (out.returncode, out.stdout) == (0, "hi\n"), out.stderr
        # cwd, user and env come from the process file podman writes.
        who = podman("exec", "-w", "/tmp", "-u", "1000:1000", "-e", "GREETING=hello", name,
                     "sh", "-c", 'pwd; id -u; id -g; echo "$GREETING"')
        assert who.stdout.split() == ["/tmp", "1000", "1000", "hello"]
        assert podman("exec", name, "sh", "-c", "exit 5", check=False).returncode == 5
        piped = run_input(podman.argv("exec", "-i", name, "cat"), "through exec\n",
                          env=podman.env)
        assert (piped.returncode, piped.stdout) == (0, "through exec\n"), piped.stderr
        code, tty_out = run_in_pty(podman.argv("exec", "-t", name, "sh", "-c", "tty; exit 2"),
                                   env=podman.env)
        assert (code, tty_out) == (2, b"/dev/pts/0\r\n")
        top = podman("exec", name, "ps", "-o", "pid,args").stdout
        assert "1 sleep 100" in " ".join(top.split()), top  # the exec saw the init as pid 1
    finally:
        podman("rm", "--force", "--time", "0", name)
    assert_gone(cid, podman.runtime_root)


# ---- containerd ---------------------------------------------------------------------------


@dataclass
class Containerd:
    root: Path
    sock: Path
    log: Path

    @property
    def runtime_root(self) -> Path:
        return self.root / "host-run" / "containerd" / "runc" / "default"

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ctr", "-a", str(self.sock), *args], check=check)

    def run_argv(self, cid: str, *cmd: str, binary: Path | str = RUNTIME,
                 tty: bool = False) -> list[str]:
        return ["ctr", "-a", str(self.sock), "run", "--rm", "--fifo-dir",
                str(self.root / "fifo"), *(["-t"] if tty else []),
                "--runtime", "io.containerd.runc.v2", "--runc-binary", str(binary),
                f"docker.io/library/{IMAGE}", cid, *cmd]


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory,
               busybox_archive: Path) -> Iterator[Containerd]:
    require_tool("containerd")
    require_tool("ctr")
    require_tool("runc")
    root = tmp_path_factory.mktemp("containerd")
    sock = root / "containerd.sock"
    (root / "config.toml").write_text(textwrap.dedent(f"""\
        version = 2
        root = "{root}/root"
        state = "{root}/state"
        disabled_plugins = ["io.containerd.grpc.v1.cri"]
        [grpc]
          address = "{sock}"
        [ttrpc]
          address = "{sock}.ttrpc"
        [debug]
          address = "{root}/debug.sock"
        [plugins."io.containerd.internal.v1.opt"]
          path = "{root}/opt"
        """))
    log = root / "containerd.log"
    c = Containerd(root, sock, log)
    argv = private_mounts({"/run": root / "host-run", "/opt": root / "host-opt"},
                          ["containerd", "--config", str(root / "config.toml")])
    started = time.monotonic()
    with open(log, "wb") as logfh:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logfh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"containerd exited {proc.returncode}:\n{_log_tail(log)}")
            if sock.exists() and c.ctr("version", check=False).returncode == 0:
                break
            if time.monotonic() - started > DAEMON_START_TIMEOUT:
                pytest.fail(f"containerd not answering after {DAEMON_START_TIMEOUT:.0f} s:\n"
                            f"{_log_tail(log)}")
            time.sleep(0.1)
        sys.stderr.write(f"\ncontainerd ready in {time.monotonic() - started:.2f} s\n")
        c.ctr("images", "import", str(busybox_archive))
        yield c
    finally:
        if proc.poll() is None:  # a failed test may have left a container: remove it
            for cid in c.ctr("containers", "list", "-q", check=False).stdout.split():
                c.ctr("tasks", "kill", "-s", "KILL", cid, check=False)
                c.ctr("tasks", "delete", "--force", cid, check=False)
                c.ctr("containers", "delete", cid, check=False)
        stop_daemon(proc)
        assert_no_leftovers(root, "containerd", log)


def test_containerd_run_output_and_exit_code(containerd: Containerd) -> None:
    out = timed("ctr run --rm (isobox-runtime)",
                lambda: run(containerd.run_argv("isobox-c1", "echo", "hi"), check=False))
    assert (out.returncode, out.stdout) == (0, "hi\n"), out.stderr + _log_tail(containerd.log)
    assert_gone("isobox-c1", containerd.runtime_root)
    timed("ctr run --rm (runc)",
          lambda: run(containerd.run_argv("runc-c1", "true", binary="runc")))

    failed = run(containerd.run_argv("isobox-c2", "sh", "-c", "echo out; echo err >&2; exit 3"),
                 check=False)
    assert (failed.returncode, failed.stdout, failed.stderr) == (3, "out\n", "err\n")
    assert_gone("isobox-c2", containerd.runtime_root)


def test_containerd_run_tty_as_runc(containerd: Containerd) -> None:
    script = "echo hi; tty; [ -t 0 ] && [ -t 1 ] && echo both-ttys; exit 4"
    ours = run_in_pty(containerd.run_argv("isobox-t1", "sh", "-c", script, tty=True))
    theirs = run_in_pty(containerd.run_argv("runc-t1", "sh", "-c", script, binary="runc",
                                            tty=True))
    assert ours == theirs
    assert ours[0] == 4 and b"/dev/pts/0" in ours[1] and b"both-ttys" in ours[1]
    assert_gone("isobox-t1", containerd.runtime_root)


# ---- dockerd ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path) -> Iterator[Docker]:
    require_tool("runc")
    root = tmp_path_factory.mktemp("dockerd")
    with running_dockerd(root, {"isobox": {"path": str(RUNTIME)}}) as docker:
        docker("load", "-i", str(busybox_archive))
        yield docker


def docker_runtime_root(docker: Docker) -> Path:
    return docker.root / "exec" / "runtime-runc" / "moby"


def docker_run(docker: Docker, cidfile: Path, *args: str) -> list[str]:
    return [DOCKER_CLI, "-H", f"unix://{docker.sock}", "run", "--rm", "--runtime", "isobox",
            "--network", "none", "--cidfile", str(cidfile), *args]


def test_docker_run_output_and_exit_code(dockerd: Docker, tmp_path: Path) -> None:
    cidfile = tmp_path / "cid"
    out = timed("docker run --rm (isobox-runtime)",
                lambda: run(docker_run(dockerd, cidfile, IMAGE, "echo", "hi"), env=dockerd.env,
                            check=False))
    assert (out.returncode, out.stdout) == (0, "hi\n"), out.stderr
    assert_gone(cidfile.read_text().strip(), docker_runtime_root(dockerd))
    timed("docker run --rm (runc)",
          lambda: dockerd("run", "--rm", "--network", "none", IMAGE, "true"))

    cidfile.unlink()
    failed = run(docker_run(dockerd, cidfile, IMAGE, "sh", "-c", "echo err >&2; exit 3"),
                 env=dockerd.env, check=False)
    assert (failed.returncode, failed.stderr) == (3, "err\n")
    assert_gone(cidfile.read_text().strip(), docker_runtime_root(dockerd))

    cidfile.unlink()
    user = run(docker_run(dockerd, cidfile, "-u", "1000:1000", IMAGE, "sh", "-c",
                          "echo out > /dev/stdout; echo err > /dev/stderr"),
               env=dockerd.env, check=False)
    assert (user.returncode, user.stdout, user.stderr) == (0, "out\n", "err\n")
    assert_gone(cidfile.read_text().strip(), docker_runtime_root(dockerd))


def test_docker_run_interactive_stdin(dockerd: Docker, tmp_path: Path) -> None:
    cidfile = tmp_path / "cid"
    out = run_input(docker_run(dockerd, cidfile, "-i", IMAGE, "cat"), "line one\nline two\n",
                    env=dockerd.env)
    assert (out.returncode, out.stdout) == (0, "line one\nline two\n"), out.stderr
    assert_gone(cidfile.read_text().strip(), docker_runtime_root(dockerd))


def test_docker_run_tty_and_exec_as_runc(dockerd: Docker, tmp_path: Path) -> None:
    script = "echo hi; tty; [ -t 0 ] && [ -t 1 ] && echo both-ttys; exit 4"
    cidfile = tmp_path / "cid"
    ours = run_in_pty(docker_run(dockerd, cidfile, "-t", IMAGE, "sh", "-c", script),
                      env=dockerd.env)
    theirs = run_in_pty([DOCKER_CLI, "-H", f"unix://{dockerd.sock}", "run", "--rm",
                         "--network", "none", "-t", IMAGE, "sh", "-c", script], env=dockerd.env)
    assert ours == theirs
    assert ours[0] == 4 and b"/dev/pts/0" in ours[1] and b"both-ttys" in ours[1]
    assert_gone(cidfile.read_text().strip(), docker_runtime_root(dockerd))

    cid = dockerd("run", "-d", "--runtime", "isobox", "--network", "none", IMAGE,
                  "sleep", "100").stdout.strip()
    try:
        out = timed("docker exec (isobox-runtime)",
                    lambda: dockerd("exec", cid, "echo", "hi", check=False))
        assert (out.returncode, out.stdout) == (0, "hi\n"), out.stderr
        assert dockerd("exec", cid, "sh", "-c", "exit 6", check=False).returncode == 6
        code, tty_out = run_in_pty([DOCKER_CLI, "-H", f"unix://{dockerd.sock}", "exec", "-t",
                                    cid, "sh", "-c", "tty; exit 2"], env=dockerd.env)
        assert code == 2 and b"/dev/pts/0" in tty_out
    finally:
        dockerd("rm", "--force", cid)
    assert_gone(cid, docker_runtime_root(dockerd))

