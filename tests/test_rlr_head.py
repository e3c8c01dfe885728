"""The RLR head (seed 003) with and without CCL (seed 002), trained from the cache through the CLI."""

import json

import numpy as np
import pytest
import torch

from cache.store import FeatureStore
from cache.stream import TrainCache
from stages.heads.rlr import RlrSettings, rlr_step
from stages.heads.rlr_model import RLRModel
from tests.conftest import clad, kill_and_resume

SMALL = ["--head", "rlr", "--set", "dim=32", "--set", "layers=1", "--set", "attn_heads=2",
         "--set", "batch_images=4"]


def test_reconstruction_loss_falls_and_the_run_evaluates(trained):
    clad("train", str(trained), "--run", "rlr", *SMALL, "--set", "epochs=6")
    summary = json.loads((trained / "runs" / "rlr" / "train.json").read_text())
    rec = [h["rec"] for h in summary["history"]]
    val = [h["val_error"] for h in summary["history"]]
    assert len(rec) == 6 and all(b < a for a, b in zip(rec, rec[1:], strict=False)) and val[-1] < val[0]
    clad("evaluate", str(trained), "--run", "rlr")
    metrics = json.loads((trained / "runs" / "rlr" / "eval" / "metrics.json").read_text())
    assert metrics["mean"]["pixel_auroc"] > 0.5  # real maps, not noise


def test_ccl_adds_its_loss_and_balanced_batches_mix_classes(trained):
    cache = TrainCache(FeatureStore(trained / "cache" / "train.zarr"))
    from cache.image_stream import ImageStream

    stream = ImageStream(cache, 4, seed=0, excluded_images=np.zeros(len(cache.image_ids), bool), balanced=True,
                         window=8)
    batch = next(iter(stream.epoch(0)))
    assert len(set(batch.label.tolist())) == 2  # two classes in the tiny set, 2 + 2
    t = RlrSettings(dim=32, layers=1, attn_heads=2, ccl="classes")
    torch.manual_seed(0)
    model = RLRModel(cache.embed_dim, 32, stream.grid, 1, 2, 7, 0.5)
    losses = rlr_step(model, batch.maps, batch.label, t, view_seed=1)
    assert set(losses) == {"rec", "ccl"} and torch.isfinite(losses["ccl"]) and losses["ccl"] > 0
    again = rlr_step(model, batch.maps, batch.label, RlrSettings(dim=32, layers=1, attn_heads=2), view_seed=1)
    assert set(again) == {"rec"}


@pytest.mark.parametrize("labels", ["classes", "pseudo"])
def test_ccl_runs_with_real_and_pseudo_labels(trained, labels):
    clad("train", str(trained), "--run", f"ccl-{labels}", *SMALL, "--set", "epochs=2", "--set", f"ccl={labels}")
    hist = json.loads((trained / "runs" / f"ccl-{labels}" / "train.json").read_text())["history"]
    assert all(np.isfinite(h["ccl"]) for h in hist)


def test_kill9_mid_training_resumes_to_identical_weights(trained):
    args = [*SMALL, "--set", "epochs=6", "--set", "ccl=classes", "--set", "dim=64"]
    clad("train", str(trained), "--run", "rlr-ref", *args, process=True)
    stderr = kill_and_resume(trained, "rlr-killed", args, after_s=0.3)
    assert "resuming" in stderr
    status = clad("status", str(trained))
    assert "rlr-killed" in status.stdout
    a = torch.load(trained / "runs" / "rlr-ref" / "checkpoints" / "final.pt", weights_only=True)["model"]
    b = torch.load(trained / "runs" / "rlr-killed" / "checkpoints" / "final.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
