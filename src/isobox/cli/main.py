"""The ``isobox`` command.

Every verb but ``job run`` is a call to ``isoboxd`` through :mod:`isobox.client` (the CLI
imports no engine code). Verbs are loaded lazily (:mod:`isobox.cli.app`): ``isobox ps``
loads click, the client and the container verbs only. ``isobox --version`` alone is answered
before click is imported (click and what it pulls in, ``typing``, ``inspect``, ``uuid``, are
~20 ms of a ~35 ms command; the answer is click's, to the byte). Errors from the one error
tree become one line on stderr and the error's exit code; anything else is a bug and shows
its traceback.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # no typing import on the --version path (~8 ms)
    from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--version"]:
        from isobox import __version__

        sys.stdout.write(f"isobox, version {__version__}\n")
        sys.stdout.flush()
        sys.exit(0)

    import click

    from isobox.cli.app import cli
    from isobox.errors import IsoboxError

    try:
        cli.main(args=args, prog_name="isobox", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except IsoboxError as exc:
        click.echo(f"isobox: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
