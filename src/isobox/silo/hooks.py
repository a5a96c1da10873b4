"""Running one OCI hook: its own argv[0], the state JSON on stdin, a timeout.

Runtime-side kinds (prestart, createRuntime, poststart, poststop) run in the runtime, on the
host. The two container-side kinds run *inside* the container init (see ``init.py``):
createContainer in all the container's namespaces before ``pivot_root`` (its path resolves
on the host, as the spec says: an image cannot supply it), startContainer after the
process's identity, capabilities, no_new_privs and seccomp are in force, just before the
program's exec. Nothing here may import a module lazily: inside the container, after
``pivot_root``, the host's Python files are out of reach.
"""

from __future__ import annotations

import subprocess

from isobox.errors import IsoboxError
from isobox.silo.config import Hook


def run_hook(hook: Hook, state: bytes) -> None:
    """Run ``hook`` with ``state`` on stdin; raise IsoboxError if it fails or times out."""
    try:
        proc = subprocess.run(
            # args[0] is the hook's argv[0], as the spec says (dockerd's own binary is its
            # prestart hook and finds its job, "libnetwork-setkey", in argv[0]).
            hook.args or [hook.path], executable=hook.path, input=state,
            env=dict(e.split("=", 1) for e in hook.env if "=" in e),
            capture_output=True, timeout=hook.timeout, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise IsoboxError(f"hook {hook.path} timed out after {hook.timeout}s") from exc
    except OSError as exc:
        raise IsoboxError(f"hook {hook.path}: {exc}") from exc
    if proc.returncode != 0:
        raise IsoboxError(
            f"hook {hook.path} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}"
        )
