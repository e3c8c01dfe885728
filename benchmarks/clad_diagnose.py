"""Diagnose a trained run per class, on training-side evidence only (no test label is read).

What tells a discriminator that generalises from one that memorises its
training synthesis, per class:

- ``probe_img`` / ``probe_pix`` / ``probe_pro``: the held-out probe (CutPaste
  and Scar versions of held-out training images, ``stages.train.probe``): image
  AUROC, pixel AUROC, AUPRO.
- ``ho_pctile``: mean percentile of the held-out normal images' image scores
  among the training images' (50 = held-out images look like training
  images; near 100 = the model scores what it trained on lower: memorised).
- ``fa_p99``: share of held-out normal images above the training images'
  99th percentile (the false-alarm tail a threshold would see).
- ``rho_nn``: Spearman correlation of held-out normal patches' scores with
  their distance to the nearest training patch of their class (should be
  high: the knn head's score is that distance).
- ``rho_bright``: the same with the patch's mean brightness (should be
  near 0: a model that learned "bright blob = defect" shows here).
- ``gas_auc`` / ``las_auc`` (learned heads with a GAS ascent): AUROC of the
  score separating held-out normal rows from GAS rows made from them with
  the run's radii after ascent, and from their cached LAS rows. Near 1.0 for
  GAS means the synthetic rows are no longer hard.
- ``bn_drift`` / ``bn_var``: for every batch-norm layer, how far each class's
  held-out normal rows sit from the running statistics evaluation uses: max
  over layers of the mean |mu_class - mu_running| / sigma_running, and the
  largest mean variance ratio var_class / var_running (1.0 = matched).

Usage: python benchmarks/clad_diagnose.py WORK RUN [RUN...]   (table + bench-results/clad_diagnose_*.json)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import progress_row, report  # noqa: E402
from cache.store import FeatureStore  # noqa: E402
from cache.stream import TrainCache  # noqa: E402
from core.files import read_json, seeded  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from stages import metrics  # noqa: E402
from stages.heads import load_trained_head  # noqa: E402
from stages.maps import anomaly_maps, image_scores  # noqa: E402
from stages.metrics import class_metrics  # noqa: E402
from stages.search import nearest_rows  # noqa: E402
from stages.train.labels import holdout_images, normal_maps  # noqa: E402
from stages.train.losses import global_synthesis  # noqa: E402
from stages.train.probe import load_or_build_probe  # noqa: E402

TRAIN_IMAGES = 40  # training images per class whose image scores form the reference distribution
PATCHES = 4000  # held-out normal patches per class for the correlations
BANK = 60000  # training rows per class searched for the nearest-neighbour distance


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """AUROC of ``pos`` (anomalous) against ``neg`` scores (``stages.metrics.auroc``; NaN if either is empty)."""
    return metrics.auroc(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])


def brightness(path: str, cfg: Any, hw: int) -> np.ndarray:
    """``[H*W]`` mean grey value of the image cell under each patch (the map's grid)."""
    from stages.extract.data import load_image

    img = load_image(path, cfg.features).mean(2)
    side = int(round(hw ** 0.5))
    cell = img.shape[0] // side
    return img[:side * cell, :side * cell].reshape(side, cell, side, cell).mean((1, 3)).reshape(-1)


def bn_statistics(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(max over BN layers of mean |mu - running_mean| / running_sigma, max of mean var / running_var)."""
    seen: list[tuple[torch.nn.BatchNorm1d, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, _out: seen.append((mod, inp[0].detach())))
             for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    drift, ratio = 0.0, 0.0
    for bn, inp in seen:
        sd = torch.sqrt(bn.running_var + bn.eps)
        drift = max(drift, float(((inp.mean(0) - bn.running_mean).abs() / sd).mean()))
        ratio = max(ratio, float((inp.var(0) / (bn.running_var + bn.eps)).mean()))
    return drift, ratio


def diagnose(work: Path, run: str) -> list[dict[str, Any]]:
    cfg = load_config(work / "runs" / run / "config.toml")
    device = torch.device("cpu")
    head, _ = load_trained_head(work / "runs" / run / "checkpoints" / "final.pt", device)
    summary = read_json(work / "runs" / run / "train.json") or {}
    store = FeatureStore(work / "cache" / "train.zarr")
    cache = TrainCache(store)
    held = holdout_images(cache, cfg.train.holdout, cfg.train.seed)
    probe = load_or_build_probe(cfg, cache, held, store.info().key, device, lambda m: print(m, file=sys.stderr))
    paths = [p for s in range(cache.n_shards) for p in cache.store.open_shard(s).attrs["paths"]]
    size = cfg.features.output_size
    model = getattr(head, "model", None)
    has_gas = model is not None and "gas" in summary and hasattr(model, "adaptor")
    hs = cfg.train.head_settings()
    rows = []
    for c, name in enumerate(cache.class_names):
        in_class = cache.image_class == c
        row: dict[str, Any] = {"run": run, "class": name}
        if probe is not None and name in probe.features:
            with torch.no_grad():
                s = head.score_maps(torch.from_numpy(probe.features[name].astype(np.float32)))
            maps = anomaly_maps(s, size, cfg.evaluate.sigma)
            m = probe.masks[name]
            met = class_metrics((m.reshape(len(m), -1).max(1) > 0).astype(int), image_scores(maps), maps, m,
                                cfg.evaluate.aupro_fpr)
            row.update(probe_img=100 * met["image_auroc"], probe_pix=100 * met["pixel_auroc"],
                       probe_pro=100 * met["aupro"])
        trained = np.nonzero(in_class & ~held)[0]
        ref = seeded(0, "diagnose", c).choice(trained, min(TRAIN_IMAGES, len(trained)), replace=False)
        ho = np.nonzero(in_class & held)[0]
        maps_np = normal_maps(cache, np.isin(np.arange(len(held)), np.r_[ref, ho]))

        def image_score(i: int) -> float:
            s = head.score_maps(torch.from_numpy(maps_np[i][None].astype(np.float32)))
            return float(image_scores(anomaly_maps(s, size, cfg.evaluate.sigma))[0])

        ref_s = np.array([image_score(i) for i in ref])
        ho_s = np.array([image_score(i) for i in ho])
        row["ho_pctile"] = float(np.mean([100 * (ref_s < v).mean() for v in ho_s]))
        row["fa_p99"] = 100 * float((ho_s > np.quantile(ref_s, 0.99)).mean())
        # patch-level: score vs nearest-neighbour distance and brightness, held-out normal patches
        ho_x = np.concatenate([maps_np[i] for i in ho]).astype(np.float32)
        with torch.no_grad():
            ho_patch = head.score_maps(torch.from_numpy(ho_x)[None])[0].numpy()
        bright = np.concatenate([brightness(paths[i], cfg, len(maps_np[i])) for i in ho])
        pick = seeded(0, "diagnose-patches", c).choice(len(ho_x), min(PATCHES, len(ho_x)), replace=False)
        bank = np.concatenate(list(cache.normal_parts(~(in_class & ~held))), dtype=np.float32)
        bank = bank[seeded(0, "diagnose-bank", c).permutation(len(bank))[:BANK]]
        bank_t = torch.from_numpy(bank)
        nn_d = nearest_rows(torch.from_numpy(ho_x[pick]), bank_t, (bank_t * bank_t).sum(1))[0][:, 0].numpy()
        row["rho_nn"] = spearman(ho_patch[pick], nn_d)
        row["rho_bright"] = spearman(ho_patch[pick], bright[pick])
        if has_gas:
            x = torch.from_numpy(ho_x[pick])
            torch.manual_seed(0)
            gas = dict(summary["gas"])
            if gas.get("class_r1"):  # per-class radii: noise and step scale with r1
                scale = gas["class_r1"][c] / gas["r1"]
                gas.update(r1=gas["r1"] * scale, r2=gas["r2"] * scale, noise=gas["noise"] * scale,
                           eta=gas["eta"] * scale)
            xg = global_synthesis(model, x, gas["r1"], gas["noise"], gas["eta"], hs.gas_steps,
                                  hs.gas_project_every, "eval")
            model.eval()
            with torch.no_grad():
                s_n, s_g = model.score(x).numpy(), model.score(xg).numpy()
            row["gas_auc"] = auroc(s_n, s_g)
            las = _las_rows(cache, ho, PATCHES)
            with torch.no_grad():
                row["las_auc"] = auroc(s_n, model.score(torch.from_numpy(las)).numpy()) if len(las) else float("nan")
            row["bn_drift"], row["bn_var"] = bn_statistics(model, x)
        rows.append(row)
        progress_row(row)
    return rows


def _las_rows(cache: TrainCache, images: np.ndarray, limit: int) -> np.ndarray:
    """The cached LAS rows of ``images`` (at most ``limit``), float32."""
    want = np.zeros(len(cache.image_ids), bool)
    want[images] = True
    parts = []
    for s in range(cache.n_shards):
        if not want[cache.image_offsets[s]:cache.image_offsets[s + 1]].any():
            continue
        d = cache.load(s, ("features", "anomaly", "image"))
        parts.append(d["features"][(d["anomaly"] == 1) & want[d["image"]]])
    x = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, cache.embed_dim), np.float32)
    return x[seeded(0, "diagnose-las").permutation(len(x))[:limit]]


def main(work: Path, runs: list[str]) -> None:
    rows = [r for run in runs for r in diagnose(work, run)]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k, "-") for k in cols} for r in rows]  # a head without GAS or batch norm: "-"
    report(f"clad_diagnose_{work.name}_{'_'.join(runs)}", rows, work=str(work), runs=runs)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2:])
