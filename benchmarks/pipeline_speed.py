"""Time ``Pipeline.register`` on single pairs (median of 200 after warm-up) and in batches.

    python benchmarks/pipeline_speed.py [--threads 2]

Prints a markdown table and writes reports/pipeline_speed.json. Keep the machine otherwise idle.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from registration import Pipeline  # noqa: E402
from registration.data.scenes import test_scenes  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--dataset", default="mnist")
    args = p.parse_args()
    torch.set_flush_denormal(True)   # before the thread pool starts (see train.py)
    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.dataset)
    scenes = test_scenes(max(args.pairs, 256), seed=1)
    for s in scenes[:20]:                                    # warm-up
        pipe.register(s.moving, s.fixed)
    rows, out = [], {"threads": args.threads}
    for label, kw in (("with localization", {}), ("without localization", {"localize": False})):
        per_stage, totals = {}, []
        for s in scenes[:args.pairs]:
            t0 = time.perf_counter()
            r = pipe.register(s.moving, s.fixed, **kw)
            totals.append((time.perf_counter() - t0) * 1e3)
            for k, v in r.timings.items():
                per_stage.setdefault(k, []).append(v)
        med = statistics.median(totals)
        out[label] = {"median_ms": med, "p90_ms": sorted(totals)[int(0.9 * len(totals))],
                      "stages_median_ms": {k: statistics.median(v) for k, v in per_stage.items()}}
        stages = ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in per_stage.items()
                           if k != "total")
        rows.append(f"| {label}, 1 pair | {med:.2f} | {1000 / med:.0f} | {stages} |")
    for bs in (16, 64, 256):
        pairs = [(s.moving, s.fixed) for s in scenes[:bs]]
        pipe.register_batch(pairs[:4])
        t0 = time.perf_counter()
        pipe.register_batch(pairs)
        dt = (time.perf_counter() - t0) * 1e3
        out[f"batch {bs}"] = {"ms_per_pair": dt / bs, "pairs_per_s": bs * 1000 / dt}
        rows.append(f"| with localization, batch of {bs} | {dt / bs:.2f} | {bs * 1000 / dt:.0f} | |")
    print(f"Pipeline.register on 112×112 MNIST scenes, {args.threads} threads\n")
    print("| case | ms / pair (median) | pairs / s | median ms per stage |\n|---|---|---|---|")
    print("\n".join(rows))
    Path("reports").mkdir(exist_ok=True)
    Path("reports/pipeline_speed.json").write_text(json.dumps(out, indent=2) + "\n")
    print("\nwrote reports/pipeline_speed.json")


if __name__ == "__main__":
    main()
