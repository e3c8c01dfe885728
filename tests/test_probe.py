"""The held-out probe's metrics and the epoch loop's selection by it, on hand-built cases."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import numpy as np
import torch

from core.layout import RunFiles
from stages.train.epochs import EpochLoop, Phase
from stages.train.probe import ProbeSet, probe_metrics


class _Bar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def test_probe_metrics_score_a_hand_built_probe_as_evaluate_would():
    """One class: a normal map (all 0) and one whose 2 x 2 patch block is 1,
    with the defect mask on that block's pixels; the score is channel 0.
    Image AUROC is 1, pixel AUROC near 1 (bilinear edges), and probe_pixel
    is the mean of pixel AUROC and AUPRO; no probe gives NaN."""
    f = np.zeros((2, 16, 3), np.float16)
    f[1, [5, 6, 9, 10], 0] = 1.0  # rows 1-2, columns 1-2 of a 4 x 4 grid
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[1, 4:12, 4:12] = 1
    probe = ProbeSet({"a": f}, {"a": masks})
    m = probe_metrics(probe, lambda x: x[..., 0], size=16, sigma=0.0, fpr_limit=0.3)
    assert m["probe_image_auroc"] == 1.0
    assert m["probe_pixel_auroc"] > 0.95
    assert math.isclose(m["probe_pixel"], (m["probe_pixel_auroc"] + m["probe_aupro"]) / 2)
    assert all(math.isnan(v) for v in probe_metrics(None, lambda x: x[..., 0], 16, 0.0, 0.3).values())


def test_every_selecting_phase_keeps_its_best_epoch_the_last_one_included(tmp_path):
    """Two selecting phases with probe values (0.1, 0.9, 0.3) and (0.5, 0.2):
    the second phase starts from epoch 1's weights, and the trained model is
    the second phase's epoch 0 (each phase selects among its own epochs)."""
    files = RunFiles(tmp_path / "run")
    files.root.mkdir(parents=True)
    ctx = types.SimpleNamespace(files=files, seed=0, cache_key="c", run_key="r", accepted_keys=("r",),
                                log=lambda m: None, make_bar=lambda *a: _Bar())
    model = torch.nn.Linear(1, 1, bias=False)
    values = {"a": [0.1, 0.9, 0.3], "b": [0.5, 0.2]}
    start_of_b = []

    def run_epoch(_i, ph, epoch, _opt):
        if ph.name == "b" and epoch == 0:
            start_of_b.append(float(model.weight.detach()))
        with torch.no_grad():
            model.weight.fill_(10 * (ph.name == "b") + epoch)  # the weight names the epoch
        return {"probe_pixel": values[ph.name][epoch]}

    loop = EpochLoop(ctx, [Phase("a", 3, True, "probe_pixel"), Phase("b", 2, True, "probe_pixel")])
    history = loop.run(model, lambda ph: torch.optim.SGD(model.parameters(), lr=0.0), run_epoch)
    assert [h["probe_pixel"] for h in history] == [0.1, 0.9, 0.3, 0.5, 0.2]
    assert start_of_b == [1.0]
    assert float(model.weight.detach()) == 10.0


def test_missing_held_out_images_leave_training_unvalidated_not_failed(tmp_path):
    """Images moved after extraction: the probe cannot be built; training
    goes on with NaN probe metrics and one line saying so."""
    from pipeline.config import config_from_dict
    from stages.train.probe import load_or_build_probe

    shard = types.SimpleNamespace(attrs={"paths": [str(tmp_path / "gone.png")]})
    store = types.SimpleNamespace(path=tmp_path / "cache" / "train.zarr", open_shard=lambda s: shard)
    cache = types.SimpleNamespace(n_shards=1, store=store, class_names=["a"], image_class=np.array([0]),
                                  image_ids=["a/gone.png"])
    lines: list[str] = []
    probe = load_or_build_probe(config_from_dict({}), cache, np.array([True]), "k", torch.device("cpu"),
                                lines.append)
    assert probe is None
    assert "training without the probe" in lines[-1] and "gone.png" in lines[-1]


def test_extract_encodes_the_probe_and_training_only_reads_it(extracted):
    """``clad extract`` leaves the probe of config.toml's split in WORK/cache/probe/; a
    second extract finds it; a run with that split encodes nothing and leaves the
    cache folder as it was, while a run with another split encodes its own."""
    from tests.conftest import TINY_TRAIN, clad

    again = clad("extract", str(extracted))  # other tests' runs may have left other splits' probes beside it
    said = again.stdout + again.stderr
    assert "encoding" not in said
    probe = Path(said.split("held-out probe in ")[1].split()[0])
    assert probe.parent == extracted / "cache" / "probe" and probe.is_file()
    before = {p: p.stat().st_mtime_ns for p in (extracted / "cache").rglob("*")}
    out = clad("train", str(extracted), "--run", "probe-read", *TINY_TRAIN, "--set", "epochs_contrastive=0",
               "--set", "epochs_finetune=1")
    assert "probe: encoding" not in out.stdout + out.stderr
    assert {p: p.stat().st_mtime_ns for p in (extracted / "cache").rglob("*")} == before
    summary = json.loads((extracted / "runs" / "probe-read" / "train.json").read_text())
    assert summary["probe_images"] == {"washer": [1, 4], "weave": [1, 4]}  # one held-out image, 4 versions
    other = clad("train", str(extracted), "--run", "probe-other", *TINY_TRAIN, "--set", "epochs_contrastive=0",
                 "--set", "epochs_finetune=1", "--set", "seed=5", "--set", "score_mix_anomalies=8")
    assert "probe: encoding 2 held-out images and 8 CutPaste/Scar versions" in other.stdout + other.stderr
    summary = json.loads((extracted / "runs" / "probe-other" / "train.json").read_text())
    assert summary["probe_images"] == {"washer": [1, 8], "weave": [1, 8]}  # the score mix asked for 8 a class


def test_the_probe_holds_as_many_anomalies_as_the_configured_head_reads():
    """``probe_size``: the paper's CLAD and every other head read the default probe, 4 a class
    and 4 versions an image; the fast and long profiles choose CLAD's score mix on 32 a class and
    16 versions an image; the settings move them, and a CLAD that does not choose by the probe asks
    for none beyond the default."""
    from core.settings import Config
    from pipeline.config import apply_sets, config_from_dict
    from stages.train.probe import MIN_ANOMALIES, probe_size

    fast = config_from_dict({"train": {"profile": "fast", "head": "clad"}})
    assert MIN_ANOMALIES == 4 and probe_size(Config()) == (4, 4)
    assert probe_size(config_from_dict({"train": {"profile": "fast"}})) == (4, 4)  # the default head: routed_knn
    assert probe_size(fast) == (32, 16)
    assert probe_size(config_from_dict({"train": {"profile": "long", "head": "clad"}})) == (32, 16)
    assert probe_size(apply_sets(fast, ["score_mix_anomalies=48", "score_mix_versions=6"])) == (48, 6)
    assert probe_size(apply_sets(fast, ["score_mix=blend"])) == (4, 4)
    assert probe_size(config_from_dict({"train": {"profile": "fast", "head": "knn"}})) == (4, 4)


def test_a_class_with_one_held_out_image_gets_more_versions_and_keeps_its_first_four(extracted):
    """The tiny workspace holds one held-out image per class: with a minimum of 32 anomalies its
    probe holds that image and 32 CutPaste/Scar versions (each with a defect mask), and the first
    four are exactly the versions of the default probe (4 a class)."""
    from cache.store import FeatureStore
    from cache.stream import TrainCache
    from pipeline.config import load_config
    from stages.train.labels import holdout_images
    from stages.train.probe import build_probe

    cfg = load_config(extracted / "config.toml")
    cache = TrainCache(FeatureStore(extracted / "cache" / "train.zarr"))
    held = holdout_images(cache, cfg.train.holdout, cfg.train.seed)
    assert np.bincount(cache.image_class[held]).tolist() == [1, 1]
    new = build_probe(cfg, cache, held, torch.device("cpu"), min_anomalies=32)
    old = build_probe(cfg, cache, held, torch.device("cpu"))
    for name in cache.class_names:
        assert len(new.features[name]) == 33 and len(old.features[name]) == 5
        assert new.masks[name][0].max() == 0 and all(m.max() == 1 for m in new.masks[name][1:])
        np.testing.assert_array_equal(new.masks[name][:5], old.masks[name])
        np.testing.assert_allclose(new.features[name][:5].astype(np.float32), old.features[name].astype(np.float32),
                                   rtol=1e-2, atol=1e-3)  # encoded in a batch of 33, not 5
        assert len({m.tobytes() for m in new.masks[name][1:]}) == 32  # 32 different defects


def test_class_probe_metrics_equal_the_evaluations_on_random_maps():
    """The probe computes only image AUROC, pixel AUROC and AUPRO: each exactly as
    ``stages.metrics.class_metrics`` gives it for the same maps (20 images, defects on 12)."""
    from stages.maps import anomaly_maps, image_scores
    from stages.metrics import class_metrics
    from stages.train.probe import class_probe_metrics

    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.random((20, 64)).astype(np.float32))
    masks = np.zeros((20, 64, 64), np.uint8)
    for i in range(8, 20):
        y, x = rng.integers(0, 48, 2)
        masks[i, y:y + 12, x:x + 10] = 1
        scores[i].view(8, 8)[y // 8:(y + 12) // 8 + 1, x // 8:(x + 10) // 8 + 1] += 0.4
    got = class_probe_metrics(scores, masks, 64, 2.0, 0.3)
    maps = anomaly_maps(scores, 64, 2.0)
    want = class_metrics((masks.reshape(20, -1).max(1) > 0).astype(int), image_scores(maps), maps, masks, 0.3)
    assert {k: got[k] for k in ("image_auroc", "pixel_auroc", "aupro")} == \
        {k: want[k] for k in ("image_auroc", "pixel_auroc", "aupro")}
    assert got["pixel"] == (want["pixel_auroc"] + want["aupro"]) / 2 and 0.5 < got["aupro"] < 1


def test_the_epochs_are_selected_on_the_first_four_versions_of_each_image():
    """A hand-built probe of two held-out images with 6 versions each (class a) and one with 2
    (class b): ``first_versions`` keeps each image and its first four versions (b: its two), in
    order, so the per-epoch probe is the one every run had before small classes got more."""
    masks = {"a": np.zeros((14, 4, 4), np.uint8), "b": np.zeros((3, 4, 4), np.uint8)}
    masks["a"][[1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13], 0, 0] = 1
    masks["b"][[1, 2], 0, 0] = 1
    feats = {k: np.arange(len(m), dtype=np.float16)[:, None, None] for k, m in masks.items()}
    sub = ProbeSet(feats, masks).first_versions()
    assert sub.features["a"][:, 0, 0].tolist() == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11]
    assert sub.features["b"][:, 0, 0].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(sub.masks["a"], masks["a"][[0, 1, 2, 3, 4, 7, 8, 9, 10, 11]])


def test_first_versions_of_a_probe_with_no_more_is_the_probe_itself():
    """The default probe (4 versions an image) is selected on whole: no copy of its features."""
    masks = {"a": np.zeros((5, 4, 4), np.uint8)}
    masks["a"][1:, 0, 0] = 1
    probe = ProbeSet({"a": np.zeros((5, 1, 1), np.float16)}, masks)
    assert probe.first_versions() is probe and probe.image_counts() == {"a": [1, 4]}


def test_versions_per_image_on_hand_built_counts():
    """Versions of each held-out image: 4 by default, more where the class would hold fewer than
    ``min_anomalies`` or an image fewer than ``min_versions``, always even (as many CutPaste as
    Scar); the default probe's file name does not move with the versions setting."""
    from stages.train.probe import ProbeSize, probe_key, versions_per_image

    assert versions_per_image(0, min_anomalies=32, min_versions=16) == 0
    assert versions_per_image(10) == 4 and versions_per_image(10, min_anomalies=32) == 4
    assert versions_per_image(1, min_anomalies=32) == 32 and versions_per_image(5, min_anomalies=32) == 8
    assert versions_per_image(10, min_anomalies=32, min_versions=16) == 16
    assert versions_per_image(1, min_anomalies=32, min_versions=16) == 32
    assert versions_per_image(10, min_versions=5) == 6 and versions_per_image(10, min_versions=3) == 4
    args = ("cache", ["a", "b"], 0)
    assert probe_key(*args) == probe_key(*args, ProbeSize(4, 4)) == probe_key(*args, ProbeSize(4, 0))
    assert probe_key(*args, ProbeSize(4, 16)) != probe_key(*args) != probe_key(*args, ProbeSize(32, 4))
