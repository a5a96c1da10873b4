"""The ``isobox`` command, run as a user runs it: a subprocess, exit codes, stdout, stderr.

Every verb but ``job run`` goes through ``isoboxd``: the fixture ``daemon`` starts one on the
test's root (tests/daemonkit.py) and checks at the end that no container left anything
behind; one test lets the CLI start the daemon itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagekit import d, f, oci_layout, tar_bytes

pytestmark = pytest.mark.root


def isobox(*args: str, check: bool = True, input: str | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "isobox.cli.main", *args], input=input,
        capture_output=True, text=True, check=False, env=os.environ.copy(), timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def daemon(isobox_env: Path) -> Iterator[Path]:
    """A real isoboxd on the test's root (the CLI must not start its own: autostart off)."""
    from daemonkit import Daemon, assert_nothing_left

    run = Path(os.environ["ISOBOX_RUN"])
    os.environ["ISOBOX_AUTOSTART"] = "0"
    d = Daemon.start(isobox_env, run)
    try:
        yield isobox_env
        ids = isobox("ps", "-aq", "--no-trunc").stdout.split()
        if ids:
            isobox("rm", "-f", *ids)
    finally:
        d.stop()
        del os.environ["ISOBOX_AUTOSTART"]
    assert_nothing_left(isobox_env, run, ids)


@pytest.fixture
def busybox(daemon: Path) -> Path:
    isobox("image", "bootstrap", "busybox")
    return daemon


def test_version_loads_no_engine_code() -> None:
    code = (
        "import sys; from isobox.cli.main import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('isobox.')), 'click' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0].startswith("isobox, version ")
    # Answered before click (or anything of the engine) is imported.
    assert out[1] == "['isobox.cli', 'isobox.cli.main'] False"


def test_the_fast_version_answer_is_clicks(capsys: pytest.CaptureFixture[str]) -> None:
    import click

    from isobox.cli.app import cli
    from isobox.cli.main import main

    with pytest.raises(SystemExit) as fast:
        main(["--version"])
    fast_out = capsys.readouterr().out
    try:  # through click's version_option (ps is never run: --version is eager)
        code = cli.main(args=["--version", "ps"], prog_name="isobox", standalone_mode=False)
    except click.exceptions.Exit as exc:  # click < 8.2 raises it
        code = exc.exit_code
    assert fast.value.code == code == 0
    assert fast_out == capsys.readouterr().out
    assert fast_out.startswith("isobox, version ")


def test_import_list_inspect_save_rmi(daemon: Path, tmp_path: Path) -> None:
    oci_layout(tmp_path / "img", [tar_bytes([d("etc"), f("etc/hello", "hi\n")])])
    out = isobox("import", str(tmp_path / "img"), "cli/test:1").stdout
    assert out.startswith("Imported cli/test:1 sha256:")
    listed = json.loads(isobox("images", "--format", "json").stdout)
    assert [i["tags"] for i in listed] == [["cli/test:1"]]
    table = isobox("images").stdout.splitlines()
    assert table[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert table[1].split()[:2] == ["cli/test", "1"]
    inspected = json.loads(isobox("image", "inspect", "cli/test:1").stdout)[0]
    assert inspected["config"]["rootfs"]["diff_ids"] == [inspected["layers"][0]["diff_id"]]
    assert Path(inspected["layer_dirs"][0], "etc", "hello").read_text() == "hi\n"
    isobox("save", "cli/test:1", "-o", str(tmp_path / "out.tar"), "--format", "docker")
    assert (tmp_path / "out.tar").stat().st_size > 0
    assert isobox("rmi", "cli/test:1").stdout.splitlines()[0] == "Untagged: cli/test:1"
    assert json.loads(isobox("images", "--format", "json").stdout) == []


def test_errors_are_one_line_with_exit_codes(daemon: Path, tmp_path: Path) -> None:
    missing = isobox("image", "inspect", "nope:1", check=False)
    assert missing.returncode == 1
    assert missing.stderr == "isobox: no such image: nope:1\n"
    bad = isobox("import", str(tmp_path), "Not A Name", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("isobox: invalid image reference")
    nothing = isobox("import", str(tmp_path / "absent"), check=False)
    assert nothing.returncode == 2 and "no such file or directory" in nothing.stderr


def test_ps_loads_only_the_client() -> None:
    code = (
        "import sys; from isobox.cli.main import main\n"
        "try:\n    main(['ps', '-a'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('isobox.', 'pydantic'))))"
    )
    env = dict(os.environ, ISOBOX_AUTOSTART="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout.splitlines()[-1]
    loaded = set(json.loads(out.replace("'", '"')))
    assert not any(m.startswith("pydantic") for m in loaded)
    engine = {m for m in loaded if not m.startswith(("isobox.cli", "isobox.client"))}
    assert engine <= {"isobox.errors", "isobox.paths", "isobox.spec", "isobox.spec.wire",
                      "isobox.spec.stream"}, engine


def test_no_daemon_is_exit_125_for_run(isobox_env: Path) -> None:
    os.environ["ISOBOX_AUTOSTART"] = "0"
    try:
        proc = isobox("run", "--rm", "busybox", "true", check=False)
    finally:
        del os.environ["ISOBOX_AUTOSTART"]
    assert proc.returncode == 125
    assert proc.stderr.startswith("isobox: cannot connect to isoboxd")


@pytest.mark.overlay
def test_run_exit_codes_and_streams(busybox: Path) -> None:
    proc = isobox("run", "--rm", "busybox", "sh", "-c", "echo out; echo err >&2; exit 7",
                  check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, "out\n", "err\n")
    proc = isobox("run", "--rm", "-e", "A=1", "-w", "/etc", "busybox", "sh", "-c",
                  "echo $A $PWD", check=False)
    assert (proc.returncode, proc.stdout) == (0, "1 /etc\n"), proc.stderr
    host = isobox("run", "--rm", "-e", "A=2", "--isolation", "host", "busybox", "sh", "-c",
                  "echo $A; exit 3", check=False)
    assert (host.returncode, host.stdout) == (3, "2\n"), host.stderr
    missing = isobox("run", "--rm", "busybox", "no-such-command", check=False)
    assert missing.returncode == 127 and "no-such-command" in missing.stderr
    no_image = isobox("run", "--rm", "nosuch/image:1", "true", check=False)
    assert no_image.returncode == 125
    assert no_image.stderr == "isobox: no such image: nosuch/image:1\n"
    bad = isobox("run", "--rm", "--memory", "1k", "busybox", "true", check=False)
    assert bad.returncode == 125 and "resources.memory" in bad.stderr
    piped = isobox("run", "--rm", "-i", "busybox", "sh", "-c", "tr a-z A-Z; exit 4",
                   input="hello\n", check=False)
    assert (piped.returncode, piped.stdout) == (4, "HELLO\n")
    assert isobox("ps", "-aq").stdout == ""  # --rm removed every one before exiting


@pytest.mark.overlay
def test_detached_ps_logs_exec_cp_restart_rm(busybox: Path, tmp_path: Path) -> None:
    cid = isobox("run", "-d", "--name", "cli-web", "-l", "team=a", "busybox", "sh", "-c",
                 "echo started; echo warn >&2; while :; do sleep 1; done").stdout.strip()
    assert len(cid) == 64
    table = isobox("ps").stdout.splitlines()
    assert table[0].split()[:3] == ["CONTAINER", "ID", "IMAGE"]
    assert table[1].split()[0] == cid[:12] and table[1].split()[-1] == "cli-web"
    assert "Up " in table[1] and " process " in table[1]
    assert isobox("ls", "--filter", "label=team=a", "-q").stdout.split() == [cid[:12]]
    assert isobox("ls", "--filter", "label=team=b", "-q").stdout == ""
    assert isobox("ls", "--filter", "isolation=host", "-q").stdout == ""
    for _ in range(100):
        logs = isobox("logs", "cli-web")
        if logs.stdout == "started\n":
            break
        time.sleep(0.1)
    assert (logs.stdout, logs.stderr) == ("started\n", "warn\n")
    ex = isobox("exec", "cli-web", "sh", "-c", "echo in; exit 3", check=False)
    assert (ex.returncode, ex.stdout) == (3, "in\n")
    assert isobox("exec", "-i", "cli-web", "cat", input="piped\n").stdout == "piped\n"
    top = isobox("top", "cli-web").stdout.splitlines()
    assert top[0].split()[0] == "PID" and any("sleep" in line for line in top[1:])
    stats = json.loads(isobox("stats", "--no-stream", "--format", "json", "cli-web").stdout)
    assert stats[0]["name"] == "cli-web" and stats[0]["pids"] >= 1
    (tmp_path / "in.txt").write_text("copied\n")
    isobox("cp", str(tmp_path / "in.txt"), "cli-web:/tmp/")
    isobox("cp", str(tmp_path / "in.txt"), "cli-web:/tmp/renamed.txt")
    assert isobox("exec", "cli-web", "cat", "/tmp/in.txt", "/tmp/renamed.txt").stdout == (
        "copied\ncopied\n")
    isobox("cp", "cli-web:/tmp/renamed.txt", str(tmp_path / "out.txt"))
    assert (tmp_path / "out.txt").read_text() == "copied\n"
    (tmp_path / "outdir").mkdir()
    isobox("cp", "cli-web:/etc", str(tmp_path / "outdir"))
    assert (tmp_path / "outdir" / "etc" / "passwd").is_file()
    assert isobox("pause", "cli-web").stdout == "cli-web\n"
    assert "(Paused)" in isobox("ps").stdout
    isobox("unpause", "cli-web")
    isobox("kill", "cli-web")
    assert isobox("wait", "cli-web").stdout == "137\n"
    assert isobox("ps", "-q").stdout == ""
    assert "Exited (137)" in isobox("ps", "-a").stdout
    isobox("start", "--isolation", "host", "cli-web")
    info = json.loads(isobox("inspect", "cli-web").stdout)[0]
    assert (info["state"], info["isolation"], info["labels"]) == ("running", "host",
                                                                  {"team": "a"})
    assert isobox("rm", "cli-web", check=False).returncode == 1  # running: a conflict
    assert isobox("rm", "-f", "cli-web").stdout == "cli-web\n"
    assert isobox("ps", "-aq").stdout == ""
    gone = isobox("logs", "cli-web", check=False)
    assert gone.returncode == 1 and gone.stderr.startswith("isobox: ")


@pytest.mark.overlay
def test_create_start_attach_and_info_events(busybox: Path) -> None:
    since = str(time.time())
    cid = isobox("create", "--name", "cli-c", "busybox", "sh", "-c", "echo once; exit 2"
                 ).stdout.strip()
    assert "Created" in isobox("ps", "-a").stdout
    started = isobox("start", "-a", "cli-c", check=False)
    assert (started.returncode, started.stdout) == (2, "once\n")
    listed = json.loads(isobox("ps", "-a", "--format", "json").stdout)
    assert [(c["id"], c["state"], c["exitCode"]) for c in listed] == [(cid, "stopped", 2)]
    info = isobox("info").stdout
    assert "apiVersion: v1" in info and "process:" in info
    events = isobox("events", "--since", since, "--no-follow", "--format", "json",
                    "--filter", "type=container").stdout.splitlines()
    actions = [json.loads(e)["action"] for e in events]
    assert actions[:2] == ["create", "start"] and "die" in actions
    isobox("rm", "cli-c")


@pytest.mark.overlay
@pytest.mark.skipif(shutil.which("script") is None, reason="util-linux script is missing")
def test_run_with_a_terminal(busybox: Path) -> None:
    cmd = (f"stty rows 33 cols 99; {sys.executable} -m isobox.cli.main run -it --rm busybox "
           "sh -c 'tty; stty size; read x; echo got=$x; exit 5'")
    proc = subprocess.run(["script", "-qec", cmd, "/dev/null"], input="abc\n",
                          capture_output=True, text=True, timeout=60, check=False,
                          env=os.environ.copy())
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "/dev/pts/0" in proc.stdout and "33 99" in proc.stdout
    assert "got=abc" in proc.stdout


@pytest.mark.overlay
def test_signals_reach_the_container(busybox: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "isobox.cli.main", "run", "--rm", "busybox", "sh", "-c",
         "trap 'echo got-int; exit 9' INT; echo ready; while :; do sleep 0.1; done"],
        stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 9
    assert proc.stdout.read() == "got-int\n"


def test_the_cli_starts_the_daemon(isobox_env: Path) -> None:
    run = Path(os.environ["ISOBOX_RUN"])
    try:
        assert isobox("ps").stdout.split()[:2] == ["CONTAINER", "ID"]
        assert (run / "isoboxd.sock").exists()
        pid = int((run / "isoboxd.lock").read_text())
        isobox("images")
        assert int((run / "isoboxd.lock").read_text()) == pid  # the same daemon answered
    finally:
        lock = run / "isoboxd.lock"
        if lock.exists() and lock.read_text().strip():
            pid = int(lock.read_text())
            os.kill(pid, signal.SIGTERM)
            for _ in range(200):
                if not Path(f"/proc/{pid}").exists():
                    break
                stat = Path(f"/proc/{pid}/stat").read_text().split()
                if stat[2] == "Z":
                    break
                time.sleep(0.05)


@pytest.mark.root
@pytest.mark.overlay
@pytest.mark.cgroup1
def test_stats_no_stream_shows_the_cpu_of_a_busy_container(busybox: Path) -> None:
    """One sample cannot give a CPU %: --no-stream measures over a short window, so a
    spinning container under --cpus 0.5 shows about half a CPU, not 0.00%."""
    cid = isobox("run", "-d", "--network", "none", "--cpus", "0.5", "busybox", "sh", "-c",
                 "while :; do :; done").stdout.strip()
    try:
        time.sleep(0.5)
        stats = json.loads(isobox("stats", "--no-stream", "--format", "json", cid).stdout)
        assert 10 <= stats[0]["cpuPercent"] <= 75, stats
    finally:
        isobox("rm", "-f", cid)
