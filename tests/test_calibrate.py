"""Verdict calibration, normalised scores, routing and user thresholds: exact values on hand-built cases."""

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from core.errors import CladError
from core.layout import RunFiles
from core.settings import CalibrateConfig, Config
from stages.metrics import verdict_metrics
from stages.train.calibrate import (
    calibration_key,
    class_threshold,
    fitted_seen,
    normalized_score,
    seen_fit,
    verdicts_in_force,
)
from stages.train.routing import Router
from tests.conftest import clad


def test_class_threshold_is_the_quantile_of_the_class_scores():
    ev = class_threshold(np.arange(1, 101, dtype=float), quantile=0.99, min_images=8)
    assert ev["threshold"] == pytest.approx(99.01, abs=1e-12)  # position 0.99 * 99 = 98.01 -> 99 + 0.01
    assert ev["n_images"] == 100 and ev["min"] == 1 and ev["max"] == 100 and ev["mean"] == 50.5
    assert class_threshold(np.arange(1, 101, dtype=float), 0.5, 8)["threshold"] == 50.5


def test_a_small_class_gets_a_wider_threshold():
    ev = class_threshold(np.array([1.0, 2.0, 3.0]), quantile=0.99, min_images=8)
    assert ev["threshold"] == pytest.approx(3 + math.sqrt(2 / 3))  # max + population std
    assert "fewer than 8" in ev["rule"]


def test_seen_scores_are_raised_by_the_gap_the_unseen_ones_show():
    r2 = math.sqrt(2)  # population std of 0, 1, 2, 3, 4
    seen = {0: np.arange(5.0), 1: np.array([10.0, 12.0]), 2: np.array([5.0, 5.0])}
    unseen = {0: 2 + r2 * np.array([1.0, 2, 3, 1, 2]),  # z = 1, 2, 3, 1, 2: its own median, 2
              1: np.array([6.0]),  # z = -5, one image: the median of every class's z instead
              2: np.array([9.0])}  # no spread among the seen scores: no z, no shift
    got = seen_fit(seen, unseen, min_unseen=5, spread=False)
    assert got[0] == pytest.approx((2 * r2, 1.0)) and got[2] == (0.0, 1.0)
    assert got[1] == pytest.approx((1.5, 1.0))  # pooled z: median of 1, 2, 3, 1, 2, -5 = 1.5, times class 1's spread 1
    # a class with fewer unseen images than asked takes the pooled z too
    assert seen_fit(seen, unseen, min_unseen=6, spread=False)[0] == pytest.approx((1.5 * r2, 1.0))
    # unseen images scored lower than the seen ones: never shifted down
    assert seen_fit({3: np.arange(5.0)}, {3: np.zeros(5)}, 5, spread=False) == {3: (0.0, 1.0)}
    # nothing unseen anywhere (a head without held-out images): nothing to measure, no shift
    assert seen_fit(seen, {}, 5) == dict.fromkeys(seen, (0.0, 1.0))


def test_a_small_class_is_shifted_at_least_as_far_as_its_own_held_out_image():
    r2 = math.sqrt(2)
    seen = {0: np.arange(5.0), 1: np.array([10.0, 12.0]), 3: np.array([0.0, 2.0])}
    unseen = {0: 2 + r2 * np.array([1.0, 2, 3, 1, 2]),  # z 1, 2, 3, 1, 2: its own fit
              1: np.array([31.0]),  # z = (31 - 11) / 1 = 20: far above the pool
              3: np.array([0.0])}  # z = -1: below the pool, which it keeps
    pooled = np.array([1.0, 2, 3, 1, 2, 20, -1])  # median 2
    plain = seen_fit(seen, unseen, min_unseen=5)
    got = seen_fit(seen, unseen, min_unseen=5, own_floor=True)
    assert plain[1] == pytest.approx((2.0, pooled.std(ddof=1)))
    assert got[1] == pytest.approx((20.0, pooled.std(ddof=1)))  # its own z 20 x its seen spread 1
    assert got[0] == plain[0] == pytest.approx((2 * r2, 1.0))  # a class with its own fit: untouched
    assert got[3] == plain[3] == pytest.approx((2.0, pooled.std(ddof=1)))
    assert fitted_seen(seen[1], *got[1])[0] < 31.0 < fitted_seen(seen[1], *got[1])[1]  # the image sits inside


def test_the_spread_of_the_unseen_scores_stretches_the_seen_ones():
    r2 = math.sqrt(2)
    seen = {0: np.arange(5.0), 1: np.array([10.0, 12.0])}
    unseen = {0: 2 + r2 * np.array([1.0, 2, 3, 1, 2]), 1: np.array([6.0])}
    got = seen_fit(seen, unseen, min_unseen=5)
    # class 0: its own z 1, 2, 3, 1, 2 have sample std sqrt(0.7) < 1: never tightened
    assert got[0] == pytest.approx((2 * r2, 1.0))
    # class 1 pools z = 1, 2, 3, 1, 2, -5: its stretch is their sample std (z is in seen-spread units)
    pooled = np.array([1.0, 2, 3, 1, 2, -5])
    assert got[1] == pytest.approx((1.5, pooled.std(ddof=1)))
    assert pooled.std(ddof=1) == pytest.approx(math.sqrt(124 / 3 / 5))  # mean 2/3, squared deviations 124/3
    # applied around the seen median: 10, 12 (median 11) -> 11 + 1.5 + (-1, 1) x stretch
    moved = fitted_seen(seen[1], *got[1])
    assert moved == pytest.approx(12.5 + np.array([-1.0, 1.0]) * pooled.std(ddof=1))
    assert fitted_seen(np.zeros(0), 1.0, 2.0).shape == (0,)


def test_seen_shift_and_its_floor_move_the_key_only_where_some_images_are_seen():
    from dataclasses import replace

    def key(head: str, **cal) -> str:
        base = Config()
        return calibration_key(replace(base, train=replace(base.train, head=head),
                                       calibrate=replace(base.calibrate, **cal)), "k")

    assert key("clad", seen_shift="gap") != key("clad", seen_shift="none") != key("clad", seen_shift="gap_spread")
    assert key("knn", seen_shift="gap") == key("knn", seen_shift="none")  # cross-fitted: every image unseen
    assert key("knn", seen_shift="gap", folds=1) != key("knn", seen_shift="none", folds=1)  # no cross-fitting
    assert key("clad", seen_own_floor=True) != key("clad", seen_own_floor=False)
    assert key("knn", seen_own_floor=True) == key("knn", seen_own_floor=False)


def test_normalised_score_puts_every_threshold_at_the_fixed_value():
    for thr, scale in ((2.47, 0.3), (-0.1, 5.0), (1e4, 1.0)):
        assert normalized_score(thr, thr, scale) == 0.5
        assert normalized_score(thr, thr, scale, at=0.8) == pytest.approx(0.8)
        s = normalized_score(np.array([thr - scale, thr + scale]), thr, scale)
        assert s[0] < 0.5 < s[1] and s[1] == pytest.approx(1 / (1 + math.exp(-1)))


def test_verdict_metrics_on_a_hand_case():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.9, 0.3, 0.8, 0.95, 0.4])
    m = verdict_metrics(labels, scores, threshold=0.5)  # flags 0.9 (normal), 0.8, 0.95
    assert m["verdict_recall"] == 2 / 3 and m["verdict_false_alarm"] == 1 / 4
    assert m["verdict_precision"] == 2 / 3 and m["verdict_f1"] == pytest.approx(2 / 3)


def test_router_picks_the_nearest_class_and_refuses_what_fits_none():
    desc = np.array([[0, 0], [0, 1], [1, 0], [10, 10], [10, 11], [11, 10]], float)
    r = Router(desc, np.array([0, 0, 0, 1, 1, 1]), ["a", "b"], quantile=1.0, ood_factor=2.0)
    assert r.ood_limit.tolist() == [2.0, 2.0]  # leave-one-out NN distances are all 1
    near_a, near_b, far = r.route(np.array([[0.5, 0.5], [10, 10.5], [50, -50]]))
    assert near_a.class_name == "a" and near_b.class_name == "b" and not near_a.ood and not near_b.ood
    assert far.ood and far.class_name in ("a", "b") and 0.9 < near_a.confidence <= 1


def test_user_threshold_wins_and_says_so(tmp_path):
    files = RunFiles(tmp_path)
    cal = {"classes": {"a": {"threshold": 1.0, "scale": 0.5}, "b": {"threshold": 2.0, "scale": 0.5}}}
    files.user_thresholds.write_text("[thresholds]\nb = 3.5\n")
    v = verdicts_in_force(cal, files, CalibrateConfig())
    assert v.thresholds == {"a": 1.0, "b": 3.5} and v.sources["b"] == "user (thresholds.toml)"
    assert v.judge("b", 3.5) == (0.5, "normal") and v.judge("b", 3.6)[1] == "anomalous"
    files.user_thresholds.write_text("[thresholds]\nc = 1\n")
    with pytest.raises(CladError, match="class 'c' is not a class of this run"):
        verdicts_in_force(cal, files, CalibrateConfig())


def test_routing_and_verdicts_through_the_cli(trained, tiny_data, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(trained, work)
    clad("evaluate", str(work), "--run", "t")
    m = json.loads((work / "runs" / "t" / "eval" / "metrics.json").read_text())
    assert all(c["routing_accuracy"] == 1.0 for c in m["per_class"].values())  # every test image routed right
    assert "## Verdicts at the run's own thresholds" in (work / "runs" / "t" / "eval" / "report.md").read_text()
    assert (work / "runs" / "t" / "eval" / "figures" / "verdicts.png").is_file()
    # the folder names the class; a user threshold for it wins and the table says so
    (work / "runs" / "t" / "thresholds.toml").write_text("[thresholds]\nweave = 0\n")  # (a negative one is refused)
    out = tmp_path / "out"
    clad("score", str(work), "--run", "t", str(tiny_data / "weave" / "test"), "--out", str(out))
    rows = json.loads((out / "results.json").read_text())["images"]
    assert rows and all(r["class"] == "weave" and r["class_from"] == "folder" for r in rows)
    assert all(r["verdict"] == "anomalous" and r["threshold_from"] == "user (thresholds.toml)" for r in rows)
    res = clad("score", str(work), "--run", "t", str(tiny_data / "weave" / "test"), "--out", str(out),
               "--class", "washer")
    rows = json.loads((out / "results.json").read_text())["images"]
    assert all(r["class"] == "washer" and r["class_from"] == "user (--class)" for r in rows)
    assert all(r["predicted_class"] == "weave" for r in rows)  # what the run would have said
    # a product the run never saw (noise) fits no class: reported as such, never judged normal
    alien = tmp_path / "alien"
    alien.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(alien / "noise.png")
    res = clad("score", str(work), "--run", "t", str(alien), "--out", str(tmp_path / "o2"))
    row = json.loads((tmp_path / "o2" / "results.json").read_text())["images"][0]
    assert row["verdict"] == "out-of-distribution" and row["in_distribution"] == "no"
    assert "1 out of distribution" in res.stderr
    bad = clad("score", str(work), "--run", "t", str(out), "--class", "nope", check=False)
    assert bad.returncode != 0 and "--class 'nope'" in bad.stderr

