import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(int(os.environ.get("TEST_THREADS", "2")))


def have_checkpoint(dataset: str, model: str) -> bool:
    d = ROOT / "checkpoints" / dataset / model
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


needs_pipeline = pytest.mark.skipif(
    not (have_checkpoint("mnist", "matcher") and have_checkpoint("mnist", "localizer")
         and have_checkpoint("mnist", "matcher-full")),
    reason="shipped MNIST checkpoints missing")
