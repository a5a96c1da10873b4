"""How the CLI prints: aligned plain-text tables, JSON, sizes and ages.

Tables are plain columns (no colour, no box drawing) so that ``awk``, ``grep`` and a
terminal read them alike; ``--format json`` prints what the API answered, unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import datetime

import click

FORMAT = click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
    help="Print a table or the API's JSON.",
)


def emit_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    for row in [headers, *rows]:
        click.echo("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def human(n: float) -> str:
    """Decimal units, as docker prints sizes."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1000
    return f"{n:.1f}GB"


def human_binary(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1024
    return f"{n:.1f}GiB"


def parse_time(ts: str | None) -> float | None:
    if not ts:
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def duration(seconds: float) -> str:
    """``3 seconds``, ``5 minutes``, ``2 hours``, ``4 days`` (docker's wording)."""
    s = int(max(seconds, 0))
    if s < 1:
        return "Less than a second"
    for size, name in ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second")):
        if s >= size:
            n = s // size
            return f"{n} {name}{'s' if n != 1 else ''}"
    return f"{s} seconds"


def ago(ts: str | None) -> str:
    t = parse_time(ts)
    return "" if t is None else f"{duration(time.time() - t)} ago"
