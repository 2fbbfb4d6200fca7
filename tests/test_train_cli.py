import json

import pytest

from registration import checkpoint, train


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
    for preset, grid, passes, n_params in (("default", 8, 3, 134), ("paper", 4, 1, 38)):
        out = tmp_path / preset
        train.main(["matcher", "--preset", preset, "--steps", "1", "--batch", "4",
                    "--val-pairs", "8", "--val-every", "1", "--threads", "1", "--out", str(out)])
        m = checkpoint.load_folder(out)
        assert (m.cfg.grid_size, m.cfg.passes) == (grid, passes)
        assert m.head.out_features == n_params
