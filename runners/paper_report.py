"""`python -m runners.paper_report [DIR]`: rebuild the paper report (README, figures) of a sweep
directory from its CSVs, without running the sweep again (testbed/experiments/paper_report.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from testbed.experiments.paper_report import write_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runners.paper_report", description=__doc__.split("\n")[0])
    ap.add_argument("dir", type=Path, nargs="?", default=Path("results/paper"))
    ap.add_argument("--no-check", action="store_true", help="skip the emulator cross-check")
    args = ap.parse_args(argv)
    if not (args.dir / "optimality.csv").exists() and not (args.dir / "scale.csv").exists():
        print(f"error: {args.dir}: no optimality.csv or scale.csv (run python -m runners.sweep paper)", file=sys.stderr)
        return 2
    write_report(args.dir, check=not args.no_check)
    print(f"wrote {args.dir / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
