import json

import numpy as np
import pytest
import torch

from registration import checkpoint, train


def train_args(argv):
    return train.build_parser().parse_args(argv)


@pytest.mark.parametrize("model", ["matcher", "localizer"])
def test_train_cli_writes_a_loadable_checkpoint_with_its_command(tmp_path, model):
    out = tmp_path / model
    train.main([model, "--steps", "2", "--batch", "4", "--val-pairs", "8", "--val-every", "1",
                "--threads", "1", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and len(metrics["log"]) == 2
    assert metrics["command"].startswith(f"python -m registration.train {model}")
    assert (out / "manifest.json").is_file()
    checkpoint.load_folder(out)


def test_budget_progress_follows_the_binding_limit():
    b = train.Budget(steps=10, minutes=None)
    assert b.progress(5) == 0.5 and not b.done(9) and b.done(10)
    assert train.cosine_lr(1.0, 500, 1e-3) == 0.0 and train.cosine_lr(0.0, 0, 1e-3, warmup=10) == 1e-4


def test_presets_build_the_shipped_and_the_papers_matcher(tmp_path):
    for preset, arch, grid, passes, n_params in (("default", "flow", 12, 1, 294),
                                                 ("cascade", "regress", 8, 3, 134),
                                                 ("paper", "regress", 4, 1, 38)):
        out = tmp_path / preset
        train.main(["matcher", "--preset", preset, "--steps", "1", "--batch", "4",
                    "--val-pairs", "8", "--val-every", "1", "--threads", "1", "--out", str(out)])
        m = checkpoint.load_folder(out)
        assert (m.cfg.arch, m.cfg.grid_size, m.cfg.passes) == (arch, grid, passes)
        with torch.no_grad():
            p = m(torch.zeros(1, 1, 28, 28), torch.zeros(1, 1, 28, 28))
        assert p.shape == (1, n_params)
    full = train.matcher_config(train_args(["matcher-full"]), full=True)
    assert (full.arch, full.grid_size, full.input_size) == ("regress", 16, 112)


@pytest.mark.parametrize("model,extra", [("segmenter", ["--pool", "8"]),
                                         ("localizer", ["--pool", "8"]),
                                         ("matcher", ["--parts"]),
                                         ("matcher-full", [])])
def test_silhouette_models_train_and_load(tmp_path, model, extra):
    out = tmp_path / model
    train.main([model, "--dataset", "silhouettes", "--steps", "2", "--batch", "6",
                "--val-pairs", "4", "--val-every", "1", "--threads", "1", "--out", str(out),
                *extra])
    m = checkpoint.load_folder(out)
    cfg = json.loads((out / "config.json").read_text())
    if model == "localizer":
        assert (cfg["image_size"], cfg["query_size"]) == (128, 64)
    if model == "matcher":
        assert (cfg["input_size"], cfg["mask_channels"]) == (32, 2)
        first = next(x for x in m.modules() if isinstance(x, torch.nn.Conv2d))
        assert first.in_channels == 4                      # moving and fixed, two parts each
    if model == "segmenter":
        assert cfg["kind"] == "segnet"


def test_segmenter_refuses_mnist():
    with pytest.raises(SystemExit):
        train.main(["segmenter", "--dataset", "mnist", "--steps", "1"])


def test_scene_pool_mirrors_boxes_with_their_images():
    class Fixed:
        """One scene: a bright 2×3 block at x 1..3, y 4..5 in a 16×16 frame."""
        def batch(self, n):
            from registration.data.scenes import Scene
            out = []
            for _ in range(n):
                f = np.zeros((16, 16), np.uint8)
                f[4:6, 1:4] = 255
                out.append(Scene(moving=np.zeros((4, 4), np.uint8), fixed=f,
                                 target_mask=f > 0, box=np.array([1, 4, 4, 6], np.float32),
                                 label=0, n_distractors=0))
            return out
    pool = train.ScenePool(Fixed(), size=8, fresh=0.5, seed=0)
    f, _, b = pool.batch(8)
    for img, box in zip(f[:, 0], b):
        ys, xs = np.nonzero(img.numpy())
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box.tolist()
    assert {tuple(x.tolist()) for x in b} == {(1, 4, 4, 6), (12, 4, 15, 6)}


def test_usct_models_train_from_one_cached_pair_set(tmp_path, monkeypatch):
    monkeypatch.setenv("REGISTRATION_CACHE", str(tmp_path / "cache"))
    for model in ("localizer", "segmenter", "matcher", "matcher-full"):
        out = tmp_path / model
        train.main([model, "--dataset", "usct", "--steps", "1", "--batch", "6", "--pairs", "6",
                    "--val-pairs", "3", "--val-every", "1", "--threads", "1", "--out", str(out)])
        checkpoint.load_folder(out)
    # made once (train 6, val 3), then read back
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "usct_train_0_6.npz", "usct_val_1_3.npz"]
    cfg = json.loads((tmp_path / "localizer" / "config.json").read_text())
    assert cfg["head_layers"] == [2, 3, 4, 5]
