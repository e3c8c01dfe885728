"""Training runs: both phases, resume after kill -9, second head on one cache, pseudo-labels."""

import json

import pytest
import torch

from pipeline.config import Config, save_config
from pipeline.runs import write_overrides
from pipeline.train_run import resolve_overrides
from pipeline.workspace import Workspace
from tests.conftest import TINY_TRAIN, clad, kill_and_resume


def _tree_mtimes(path):
    return {str(p): p.stat().st_mtime_ns for p in path.rglob("*")}


def test_both_phases_train_and_losses_fall(trained):
    summary = json.loads((trained / "runs" / "t" / "train.json").read_text())
    hist = summary["history"]
    assert [h["phase"] for h in hist] == ["contrastive"] * 2 + ["finetune"] * 2
    first, last = hist[0], hist[1]
    assert last["contrast"] < first["contrast"] and last["cls"] < first["cls"]
    thresholds = summary["thresholds"]  # one per class, calibrated on training normals
    assert sorted(thresholds) == ["washer", "weave"] and all(v == v for v in thresholds.values())
    ck = torch.load(trained / "runs" / "t" / "checkpoints" / "final.pt", weights_only=True)
    assert ck["meta"]["n_labels"] == 2 and ck["meta"]["head"] == "clad"
    res = clad("train", str(trained), "--run", "t", *TINY_TRAIN)
    assert "already trained" in res.stderr


def test_changed_setting_is_refused_not_mixed(trained):
    res = clad("train", str(trained), "--run", "t", *TINY_TRAIN, "--set", "margin=2", check=False)
    assert res.returncode != 0 and "margin" in res.stderr and "--restart" in res.stderr


def test_second_head_trains_on_the_same_cache_without_extraction(trained):
    before = _tree_mtimes(trained / "cache")
    res = clad("train", str(trained), "--run", "knn", "--head", "knn")
    assert "extract" not in res.stderr.split("train:")[0]
    assert _tree_mtimes(trained / "cache") == before
    summary = json.loads((trained / "runs" / "knn" / "train.json").read_text())
    assert summary["head"] == "knn" and summary["bank_rows"] == 8 * 784
    res = clad("train", str(trained), "--run", "core", "--head", "knn", "--set", "knn_coreset=0.25")
    assert "coreset 1568/1568" in res.stderr  # progress lines while it picks
    core = json.loads((trained / "runs" / "core" / "train.json").read_text())
    assert core["bank_rows"] == 8 * 784 // 4


def test_pseudo_labels(trained):
    clad("train", str(trained), "--run", "pseudo", *TINY_TRAIN, "--set", "data.labels=pseudo",
         "--set", "pseudo_k=3", "--set", "epochs_finetune=1")
    summary = json.loads((trained / "runs" / "pseudo" / "train.json").read_text())
    assert summary["labels"] == "pseudo" and summary["n_labels"] == 3
    assert len(set(summary["image_labels"])) >= 2


@pytest.mark.parametrize("extra", [["--set", "gas_shell=fixed"],  # the workspace's fast profile is adaptive
                                   ["--set", "gas_shell=adaptive", "--set", "gas_shell_target=0.6"]],
                         ids=["fixed-shell", "adaptive-shell"])
def test_kill9_mid_epoch_resumes_to_identical_weights(trained, extra):
    """Also with the adaptive GAS shell, whose per-class radii after each epoch live in the
    epoch records: a resumed run must take them up, or its weights differ (the tiny set's
    low target makes the shells move every epoch)."""
    args = ["--head", "clad", "--set", "epochs_contrastive=2", "--set", "epochs_finetune=1",
            "--set", "batch_contrastive=1200",
            "--set", "batch_finetune=3000", "--set", "gas_steps=2", "--set", "gas_project_every=2", *extra]
    tag = "-adaptive" if "gas_shell=adaptive" in extra else ""
    clad("train", str(trained), "--run", "ref" + tag, *args, process=True)
    stderr = kill_and_resume(trained, "killed" + tag, args, after_s=0.7)  # into the next epoch
    assert "resuming at contrastive epoch 1" in stderr  # killed in the contrastive phase: the resume crosses
    # into fine-tuning
    a = torch.load(trained / "runs" / f"ref{tag}" / "checkpoints" / "final.pt", weights_only=True)["model"]
    b = torch.load(trained / "runs" / f"killed{tag}" / "checkpoints" / "final.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if tag:
        shells = [r["gas_shell"] for r in json.loads((trained / "runs" / f"ref{tag}" / "train.json").read_text())
                  ["history"]]
        assert len({tuple(s) for s in shells}) > 1  # the shells did move


def test_truncated_checkpoint_is_reported_corrupt_not_partial(trained):
    args = ["--set", "epochs_contrastive=1", "--set", "epochs_finetune=0"]
    clad("train", str(trained), "--run", "trunc", *TINY_TRAIN, *args)
    ckpt = trained / "runs" / "trunc" / "checkpoints"
    latest = ckpt / "latest.pt"
    (trained / "runs" / "trunc" / "train.json").unlink()  # as if killed before the end
    latest.write_bytes(latest.read_bytes()[:2000])  # truncated
    line = next(x for x in clad("status", str(trained)).stdout.splitlines() if x.startswith("train[trunc]"))
    assert "corrupt" in line and "--restart" in line
    res = clad("train", str(trained), "--run", "trunc", *TINY_TRAIN, *args, check=False)
    assert res.returncode == 2 and "cannot be read" in res.stderr and "--restart" in res.stderr
    assert "Traceback" not in res.stderr


def test_restart_forgets_every_remembered_choice(tmp_path):
    """--restart drops the run's remembered --set values and its --head alike
    (before: the sets were dropped and the head kept)."""
    ws = Workspace(tmp_path)
    save_config(Config(), ws.config_path)
    ws.run_dir("r").mkdir(parents=True)
    write_overrides(ws, "r", {"profile": "fast", "head": "clad", "sets": ["margin=2.0"]})
    kept = resolve_overrides(ws, "r", {}, restart=False)
    assert kept["head"] == "clad" and kept["sets"] == ["margin=2.0"] and kept["profile"] == "fast"
    fresh = resolve_overrides(ws, "r", {}, restart=True)
    assert fresh["head"] == Config().train.head and "sets" not in fresh
    assert fresh["profile"] == Config().train.profile
    assert resolve_overrides(ws, "r", {"head": "knn"}, restart=True)["head"] == "knn"
