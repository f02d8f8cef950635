"""`python -m tools.bench.gguf [--out DIR] [--keep]`: peak memory of loading a llama GGUF file
of 200+ M parameters, against the size of its dequantised blocks.

Writes a synthetic Llama file with random weights (testbed/model/gguf_synth.py: 14 layers,
d_model 1024, 16 heads sharing 4 K/V heads, SwiGLU 4096, a 32000-token vocabulary;
Q8_0 weights), then, in a fresh process per mode, loads it:
- `blocks`: every block and the source through `GGUFWeights`, kept in a dict (what a device
  process holding the whole model would hold);
- `reference`: the monolithic `Reference` (head blocks with Q/K/V fused, as every run builds
  it).
Each child reports its resident set before loading (after the imports), its peak resident
set (getrusage ru_maxrss) and the bytes of the tensors it holds; the tool prints the peak
increase over the baseline divided by the dequantised size. The target is under 1.5: the
blocks plus one chunk in flight (`GGUFFile.iter_rows` dequantises a few MiB at a time and
releases the file pages it read), not a whole-model copy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from testbed.model.gguf_synth import Synth, write_gguf

SYNTH = Synth(arch="llama", tokenizer="spm", qtype="Q8_0", layers=14, d_model=1024, heads=16, kv_heads=4,
              d_ff=4096, pad_vocab=32000, context=4096)
TARGET = 1.5


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(path: str, mode: str) -> None:
    """Load the file one way; print a JSON line with the measurements."""
    import torch

    from testbed.model import cost
    from testbed.model.blocks import Reference
    from testbed.model.gguf_file import spec_from_gguf
    from testbed.model.gguf_weights import GGUFWeights

    torch.set_num_threads(1)
    spec = spec_from_gguf(path)  # the metadata (parsed once, kept: part of the baseline)
    base = _rss()
    t0 = time.perf_counter()
    w = GGUFWeights(spec)
    if mode == "blocks":
        held = {b.name: w.block(b.name) for b in spec.blocks}
        held["source"] = w.source()
        nbytes = sum(t.nbytes for blk in held.values() for t in blk.values())
    else:
        ref = Reference(w)
        nbytes = sum(t.nbytes for t in ref.source.w.values())
        nbytes += sum(t.nbytes for layer in ref.heads for h in layer for t in h.w.values())
        nbytes += sum(t.nbytes for p in ref.proj for t in p.w.values())
        nbytes += sum(t.nbytes for f in ref.ffn for t in f.w.values())
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = (cost.model_weight_bytes(spec) + cost.source_weight_bytes(spec)) // spec.bytes_per_elem
    print(json.dumps({"mode": mode, "params": params, "dequantised": nbytes, "baseline_rss": base,
                      "peak_rss": peak, "after_rss": _rss(), "seconds": seconds,
                      "expected": cost.model_weight_bytes(spec) + cost.source_weight_bytes(spec)}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.gguf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="where to write the file (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the file")
    ap.add_argument("--child", nargs=2, metavar=("FILE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    folder = args.out or Path(tempfile.mkdtemp(prefix="bench_gguf-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "synthetic-llama-Q8_0.gguf"
    t0 = time.perf_counter()
    write_gguf(path, SYNTH)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - t0:.0f} s)")
    ok = True
    try:
        for mode in ("blocks", "reference"):
            out = subprocess.run([sys.executable, "-m", "tools.bench.gguf", "--child", str(path), mode],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            mib = 2**20
            grow = r["peak_rss"] - r["baseline_rss"]
            ratio = grow / r["dequantised"]
            ok &= ratio < TARGET and r["dequantised"] == r["expected"]
            print(f"{mode:9s}  {r['params'] / 1e6:.0f} M parameters, dequantised {r['dequantised'] / mib:.0f} MiB "
                  f"(cost model {r['expected'] / mib:.0f} MiB); resident {r['baseline_rss'] / mib:.0f} MiB before, "
                  f"peak {r['peak_rss'] / mib:.0f} MiB: peak increase {grow / mib:.0f} MiB = {ratio:.2f} x the "
                  f"dequantised size (target < {TARGET}); {r['seconds']:.1f} s")
    finally:
        if not args.keep and args.out is None:
            path.unlink()
            folder.rmdir()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
