"""`python -m tools.bench.refusals`: how fast the runner refuses absurd scenario files.

Runs `python -m runners.run FILE` once per class of absurd input (tests/bad_scenarios.py,
`LIMIT_SCENARIOS`: YAML nested 20,000 deep, a 300-character name, `memory_mib: 1e300`,
`interval_tokens: 1e30`, `compute_gflops: 1e-12`, a model larger than this host, a 50 MB
description, ...), one after the other, and prints for each the exit status, whether stderr
is exactly one line, whether a run directory was left, and the wall time (target: 5 s,
Python's start-up included). Run it from the repository root. Exit status 1 if any class
was not refused as it should be (the time is reported, not judged: it depends on the host).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET_S = 5.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.refusals", description=__doc__.split("\n")[0])
    p.add_argument("--only", help="comma-separated class ids (default: all)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.bad_scenarios import LIMIT_SCENARIOS

    wanted = set(args.only.split(",")) if args.only else None
    bad = 0
    times = []
    print(f"{'class':32} {'exit':>4} {'lines':>5} {'run dir':>7} {'wall s':>7}")
    with tempfile.TemporaryDirectory(prefix="bench-refusals-") as tmp:
        for ident, text, _ in LIMIT_SCENARIOS:
            if wanted is not None and ident not in wanted:
                continue
            path, out = Path(tmp) / f"{ident}.yaml", Path(tmp) / ident / "out"
            path.write_text(text, encoding="utf-8")
            w0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "runners.run", str(path), "--out", str(out)],
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
            wall = time.perf_counter() - w0
            times.append(wall)
            lines = len(r.stderr.strip().splitlines())
            left = out.exists() and any(out.iterdir())
            ok = r.returncode == 2 and lines == 1 and not left and "Traceback" not in r.stderr + r.stdout
            bad += not ok
            print(f"{ident:32} {r.returncode:>4} {lines:>5} {'yes' if left else 'no':>7} {wall:>7.2f}"
                  f"{'' if ok else '  NOT REFUSED AS EXPECTED'}", flush=True)
    if times:
        over = sum(t > TARGET_S for t in times)
        print(f"max {max(times):.2f} s, mean {sum(times) / len(times):.2f} s over {len(times)} classes; "
              f"{over} above the {TARGET_S:g} s target")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
