"""CLAD's score mix on one trained model: each ``score_mix`` mode side by side.

For one trained CLAD run, fits the mix of every mode on the run's held-out
probe (``stages.heads.clad_mix.fit_mix``; training data only) and scores the
test set with each: ``discriminator`` (s alone, the paper), ``probe`` (the
per-class choice, the fast profile's default), ``blend`` and ``distance``
(every class forced to s + d or d). The network is the same in every row, so
the rows differ only by how a patch is scored. Test labels only measure.
``--space`` says where d is measured (``score_mix_space``: final, contrastive,
probe; the run's own setting without it).

Usage: python benchmarks/score_mix.py WORK RUN [--space final|contrastive|probe]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.adaptor_knn import head_metrics, test_items  # noqa: E402
from benchmarks.common import progress_row, report  # noqa: E402
from cache.store import FeatureStore  # noqa: E402
from cache.stream import TrainCache  # noqa: E402
from core.layout import RunFiles  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from stages.heads import load_trained_head  # noqa: E402
from stages.heads.clad_mix import contrastive_space, fit_mix  # noqa: E402
from stages.train.stage import train_context  # noqa: E402

MODES = ("discriminator", "probe", "blend", "distance")


def main(work: Path, run: str, space: str | None = None) -> None:
    files = RunFiles(work / "runs" / run)
    cfg = load_config(files.root / "config.toml")
    device = torch.device("cpu")
    head, _ = load_trained_head(files.final, device)
    cache = TrainCache(FeatureStore(work / "cache" / "train.zarr"))
    ctx = train_context(cfg, cache, files, device, cache.store.info().key, print, lambda *_: None)
    min_images = head.settings.score_mix_min_images
    space = space or head.settings.score_mix_space
    second = contrastive_space(head.model, ctx) if space != "final" else None
    tests = list(test_items(work))
    rows, chosen = [], {}
    for mode in MODES:
        t0 = time.perf_counter()
        head.model.set_space(second)  # fit_mix keeps it for the classes that choose it
        # whole banks (score_mix_coreset 1.0): the modes compare on every row; mix_coreset.py measures the cut
        head.mix, head._banks = (fit_mix(head.model, mode, min_images, ctx, head.settings.score_mix_pool, space)
                                 if mode != "discriminator" else (None, {}))
        fit_s = time.perf_counter() - t0
        if head.mix is not None:
            chosen[mode] = {c["class"]: (f"{c['weight']}{'@c' * (c['space'] == 'contrastive')}", c["chosen_on"])
                            for c in head.mix.choices}
        for name, feats, masks, labels in tests:
            m, per_image = head_metrics(head, cfg, feats, masks, labels)
            w = chosen.get(mode, {}).get(name, (0.0, "-"))
            rows.append({"mode": mode, "class": name, "weight": w[0], "chosen_on": w[1],
                         "image_auroc": round(100 * m["image_auroc"], 1),
                         "pixel_auroc": round(100 * m["pixel_auroc"], 1), "aupro": round(100 * m["aupro"], 1),
                         "ms_per_image": round(1000 * per_image, 1), "fit_s": round(fit_s, 1)})
            progress_row(rows[-1])
    for mode in MODES:
        own = [r for r in rows if r["mode"] == mode]
        rows.append({"mode": mode, "class": "mean", "weight": "", "chosen_on": "",
                     **{k: round(float(np.mean([r[k] for r in own])), 1)
                        for k in ("image_auroc", "pixel_auroc", "aupro", "ms_per_image")},
                     "fit_s": own[0]["fit_s"]})
    report(f"score_mix_{work.name}_{run}_{space}", rows, work=str(work), run=run, on="test set", space=space,
           note="mix fitted on the held-out probe (training data); test labels only measure; weight@c: d "
                "after the contrastive phase's adaptor")


if __name__ == "__main__":
    args = sys.argv[1:]
    where = None
    if "--space" in args:
        i = args.index("--space")
        where, args = args[i + 1], args[:i] + args[i + 2:]
    if len(args) != 2 or where not in (None, "final", "contrastive", "probe"):
        sys.exit(__doc__)
    main(Path(args[0]), args[1], where)
