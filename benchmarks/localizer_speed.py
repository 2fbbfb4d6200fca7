"""The networks' forward pass for one pair: eager vs frozen (``registration/frozen.py``), and the
SSD layouts tried for a cheaper localizer (untrained weights: speed only).

    python benchmarks/localizer_speed.py [--n 300] [--threads 2]

Every variant runs on the same inputs taking turns call by call (``timing.interleaved_ms``;
this host's speed drifts over minutes). Prints a markdown table of median ms.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from registration import checkpoint  # noqa: E402
from registration.config import UNSHUFFLE_LOCALIZER, LocalizerConfig  # noqa: E402
from registration.evaluate import _table  # noqa: E402
from registration.localizer import Localizer  # noqa: E402
from timing import interleaved_ms  # noqa: E402  (benchmarks/timing.py)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    loc = checkpoint.load("mnist", "localizer")
    mat = checkpoint.load("mnist", "matcher")
    narrow = dict(UNSHUFFLE_LOCALIZER, channels=(32, 48, 64, 64, 48, 32))
    nets = {
        "MNIST SSD (shipped), eager": (loc.for_inference(freeze=False), "ssd"),
        "MNIST SSD (shipped), frozen": (loc.for_inference(), "ssd"),
        "SSD, unshuffle stem 32-48-64-64-48-32, frozen (untrained)":
            (Localizer(LocalizerConfig(**narrow)).for_inference(), "ssd"),
        "SSD, unshuffle stem 48-96-64-64-48-32 (config.UNSHUFFLE_LOCALIZER), frozen (untrained)":
            (Localizer(LocalizerConfig(**UNSHUFFLE_LOCALIZER)).for_inference(), "ssd"),
        "MNIST matcher U-Net, eager": (mat.for_inference(freeze=False), "matcher"),
        "MNIST matcher U-Net, frozen": (mat.for_inference(), "matcher"),
    }
    g = torch.Generator().manual_seed(0)
    fixed, query = torch.rand(1, 1, 112, 112, generator=g), torch.rand(1, 1, 28, 28, generator=g)
    masks = (torch.rand(1, 1, 28, 28, generator=g) > 0.5).float()
    fns = {name: (lambda i, m=m: m(fixed, query)) if kind == "ssd"
           else (lambda i, m=m: m(masks, masks)) for name, (m, kind) in nets.items()}
    with torch.no_grad():                      # as the pipeline runs them
        ms = interleaved_ms(fns, n=args.n)
    print(f"One pair's forward pass, {args.threads} threads, median of {args.n} (taking turns)\n")
    print(_table(["network", "ms"], [[k, f"{v:.2f}"] for k, v in ms.items()]))


if __name__ == "__main__":
    main()
