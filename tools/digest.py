"""Digests of the result files every shipped scenario writes on the virtual clock, to show
that a change of the code changed no result (a restructure must leave them byte-identical).

`python -m tools.digest [--against REV] [--scenarios GLOB] [--jobs N]`
Runs every scenario (`runners.run --clock virtual`) in this checkout and prints one SHA-256
per result file. With `--against REV`, it also runs them in a temporary git worktree of that
revision (removed afterwards) and compares: exit 0 when every file is identical, else 1
with one line per file that differs. What legitimately differs between two runs of the same
code is left out of the digest: the wall-clock time of each decision (`decision_ms` in
events.csv and summary.json), the run's wall time and host record (summary.json) and the
provenance fields of meta.json (times, revision, host, versions).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOLATILE_META = ("start", "end", "git_revision", "host", "platform", "python", "torch")
VOLATILE_SUMMARY = ("wall_s", "host", "decision_ms")
DECISION = re.compile(rb"decision_ms=[0-9.eE+-]+")


def canonical(name: str, data: bytes) -> bytes:
    """A result file's bytes without what differs between two runs of the same code."""
    if name == "events.csv":
        return DECISION.sub(b"decision_ms=*", data)
    if name in ("meta.json", "summary.json"):
        doc = json.loads(data)
        for key in VOLATILE_META if name == "meta.json" else VOLATILE_SUMMARY:
            doc.pop(key, None)
        return json.dumps(doc, sort_keys=True).encode()
    return data


def run_all(checkout: Path, scenarios: list[str], jobs: int) -> dict[str, str]:
    """`{scenario/file: sha256}` of every scenario's virtual run in `checkout`."""
    out = Path(tempfile.mkdtemp(prefix="digest-"))

    def one(name: str) -> None:
        r = subprocess.run([sys.executable, "-m", "runners.run", f"scenarios/{name}", "--clock", "virtual",
                            "--out", str(out), "--quiet"], cwd=checkout, capture_output=True, text=True,
                           timeout=1800)
        if r.returncode != 0:
            raise SystemExit(f"digest: {name} failed in {checkout}: {r.stderr.strip().splitlines()[-1:]}")

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, scenarios))
    digests = {}
    for run in sorted(p for p in out.glob("*/*") if p.is_dir()):
        for f in sorted(run.iterdir()):
            digests[f"{run.parent.name}/{f.name}"] = hashlib.sha256(canonical(f.name, f.read_bytes())).hexdigest()
    shutil.rmtree(out, ignore_errors=True)
    return digests


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.digest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", metavar="REV", help="compare with the results of this git revision")
    ap.add_argument("--scenarios", default="*.yaml", metavar="GLOB", help="scenario files under scenarios/")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    args = ap.parse_args(argv)
    scenarios = sorted(p.name for p in (ROOT / "scenarios").glob(args.scenarios))
    if not scenarios:
        print(f"digest: no scenario matches {args.scenarios!r}", file=sys.stderr)
        return 2
    here = run_all(ROOT, scenarios, args.jobs)
    if args.against is None:
        for key, digest in here.items():
            print(f"{digest}  {key}")
        return 0
    with tempfile.TemporaryDirectory(prefix="digest-rev-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), args.against], cwd=ROOT, check=True)
        try:
            # a scenario this revision added has nothing to be compared with there
            new = [s for s in scenarios if not (tree / "scenarios" / s).is_file()]
            there = run_all(tree, [s for s in scenarios if s not in new], args.jobs)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    if new:
        print(f"not in {args.against} (not compared): {', '.join(new)}")
        stems = {Path(s).stem for s in new}
        here = {k: v for k, v in here.items() if k.split("/")[0] not in stems}
        scenarios = [s for s in scenarios if s not in new]
    differ = sorted(k for k in here.keys() | there.keys() if here.get(k) != there.get(k))
    for key in differ:
        print(f"differs: {key}")
    print(f"{len(here) - len(differ)} of {len(here | there)} result files identical to {args.against}'s "
          f"({len(scenarios)} scenarios, virtual clock)")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
