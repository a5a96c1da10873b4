#!/usr/bin/env python3
"""Write docs/openapi.json: the OpenAPI document of isoboxd's API, built from the code.

Run after changing a route or a wire model (tests/test_openapi.py fails until you do):

    .venv/bin/python scripts/gen_openapi.py          # rewrite the file
    .venv/bin/python scripts/gen_openapi.py --check  # exit 1 when it is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from isobox.api.openapi import document, render

TARGET = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    p.add_argument("--output", type=Path, default=TARGET)
    args = p.parse_args()
    text = render(document())
    current = args.output.read_text() if args.output.exists() else None
    if args.check:
        if current != text:
            print(f"{args.output} is stale: run scripts/gen_openapi.py", file=sys.stderr)
            return 1
        return 0
    if current != text:
        tmp = args.output.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(args.output)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
