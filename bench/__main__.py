"""``python -m bench [--list] [--rounds N] [NAME ...]``: run benchmarks, write results.

Exit status: 0 when every benchmark ran (a scenario that is "not available" here, such as
a tool that is not installed, is reported but does not fail the run); 1 when a scenario's
command failed or a benchmark raised; 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import traceback
from pathlib import Path
from typing import Protocol, cast

from bench import REGISTRY
from bench.harness import Config, Report, log, write_report


class Benchmark(Protocol):
    NAME: str
    TITLE: str

    def run(self, config: Config) -> Report: ...


def load(name: str) -> Benchmark:
    return cast(Benchmark, importlib.import_module(REGISTRY[name]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all of {', '.join(REGISTRY)})",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--rounds", type=int, help="timed rounds (default: $BENCH_ROUNDS or 5)")
    parser.add_argument("--warmup", type=int, help="untimed runs first ($BENCH_WARMUP or 1)")
    parser.add_argument("--results-dir", type=Path, help="default: bench/results")
    args = parser.parse_args(argv)

    if args.list:
        for name in REGISTRY:
            print(f"{name}: {load(name).TITLE}")
        return 0
    unknown = [n for n in args.names if n not in REGISTRY]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(REGISTRY)}")

    config = Config.from_env()
    if args.rounds is not None:
        config = dataclasses.replace(config, rounds=args.rounds)
    if args.warmup is not None:
        config = dataclasses.replace(config, warmup=args.warmup)
    if config.rounds < 1 or config.warmup < 0:
        parser.error("rounds must be >= 1 and warm-up runs >= 0")

    status = 0
    for name in args.names or list(REGISTRY):
        log(f"{name}: {config.rounds} rounds, {config.warmup} warm-up run(s) per scenario")
        try:
            report = load(name).run(config)
        except Exception:
            traceback.print_exc()
            log(f"{name}: FAILED (exception above)")
            status = 1
            continue
        json_path, md_path = (
            write_report(report, args.results_dir) if args.results_dir else write_report(report)
        )
        print(f"\n## {name}: {report.title}\n\n{report.table()}\n")
        for note in report.notes[-1:]:
            print(note)
        print(f"\nwritten: {json_path}, {md_path}\n", flush=True)
        if report.failed:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
