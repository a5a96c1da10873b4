"""The ``isobox`` click group: every verb, each imported from its module when it runs.

The group knows each verb's module by name and imports it only when that verb runs, so
``isobox ps`` loads the client and the container verbs only (see :mod:`isobox.cli.main`,
which answers ``--version`` before this module, and click, are imported at all).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from isobox import __version__

# verb -> (module under isobox.cli, attribute, one-line help for ``isobox --help``)
_LAZY: dict[str, tuple[str, str, str]] = {
    "run": ("containers", "run", "Run a command in a new container."),
    "create": ("containers", "create", "Create a container (not started)."),
    "start": ("containers", "start", "Start created or stopped containers."),
    "stop": ("containers", "stop", "Stop running containers."),
    "kill": ("containers", "kill", "Send a signal to containers."),
    "rm": ("containers", "rm", "Remove containers."),
    "ps": ("listing", "ps", "List containers."),
    "ls": ("listing", "ls", "List containers with filters (state, isolation, label)."),
    "logs": ("listing", "logs", "Print a container's output."),
    "exec": ("containers", "exec_", "Run a command in a running container."),
    "top": ("listing", "top", "The processes of a container."),
    "stats": ("listing", "stats", "CPU, memory, processes and I/O of containers."),
    "inspect": ("listing", "inspect", "Show containers or images as JSON."),
    "wait": ("containers", "wait", "Wait for containers to stop; print exit codes."),
    "pause": ("containers", "pause", "Freeze containers."),
    "unpause": ("containers", "unpause", "Thaw containers."),
    "events": ("listing", "events", "Print events as they happen."),
    "cp": ("copying", "cp", "Copy files between a container and the host."),
    "info": ("listing", "info", "The daemon and what it can run."),
    "images": ("images", "images", "List images."),
    "image": ("images", "image", "Manage images."),
    "import": ("images", "import_", "Import an image archive, layout or root filesystem."),
    "save": ("images", "save", "Write an image as an OCI or docker archive."),
    "rmi": ("images", "rmi", "Remove images."),
    "tag": ("images", "tag", "Give an image another name."),
    "network": ("networks", "network", "Manage networks (create, ls, inspect, rm)."),
    "uvm": ("uvmcmd", "uvm", "Utility-VM assets: build, info (local admin tool)."),
}


class LazyGroup(click.Group):
    """A group whose verbs are imported from their module when first used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY:
            module, attr, _ = _LAZY[cmd_name]
            cmd = getattr(importlib.import_module(f"isobox.cli.{module}"), attr)
            assert isinstance(cmd, click.Command)
            return cmd
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # The help lists every verb without importing one.
        rows = [(name, _LAZY[name][2]) for name in sorted(_LAZY)]
        for name in super().list_commands(ctx):
            cmd = super().get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(45)))
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="isobox")
def cli() -> None:
    """isobox: one image, isolation chosen at run time (process, vm or host)."""


# ---- jobs ---------------------------------------------------------------------------------


@cli.group()
def job() -> None:
    """Run host commands in a Job: limits, accounting, notifications (cgroup v1/v2)."""


@job.command("run", context_settings={"ignore_unknown_options": True})
@click.option("--cpu-rate", type=int, help="Hard CPU cap in 1/100 % of the machine (1..10000).")
@click.option("--cpus", type=float, help="Hard CPU cap in CPUs (1.5 = one and a half CPUs).")
@click.option("--cpu-weight", type=int, help="CPU weight 1..10000 (100 is the default share).")
@click.option("--memory", help="Job memory limit (20m, 1g).")
@click.option("--process-memory", help="Per-process memory limit (RLIMIT_AS).")
@click.option("--pids", type=int, help="Task limit: processes and threads.")
@click.option("--cpuset", help="CPUs the job may use (0-1).")
@click.option("--io-read-bps", multiple=True, metavar="DEV:RATE", help="Read rate per device.")
@click.option("--io-write-bps", multiple=True, metavar="DEV:RATE", help="Write rate per device.")
@click.option("--name", help="Job name (default: a random one).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="How to print the accounting (on stderr) at exit.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def job_run(command: tuple[str, ...], **opts: Any) -> None:
    """Run COMMAND in a fresh job; exit with its exit code; print the job's accounting.

    When COMMAND exits, whatever it left running in the job is killed (kill on close), and
    the accounting then counts every process that ran. Example (the seeds' JobExample):
    isobox job run --cpu-rate 150 --memory 20m -- CMD
    """
    from isobox.cli.jobrun import run_job

    sys.exit(run_job(list(command), **opts))
