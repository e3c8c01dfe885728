"""How much CLAD's score-mix choice rests on which CutPaste/Scar versions the probe drew.

For one trained CLAD run (the network is fixed), draws the probe of the given
classes' held-out images again with other seeds and more or fewer versions per
image (``stages.train.probe.build_probe``), fits the score mix on each draw
(``stages.heads.clad_mix.fit_mix``, whole banks) and prints per draw the chosen
candidate and the pooled mean ranks, then per class the spread (std over draws,
mean over candidates) of the probe pixel metric. Training data only: the
held-out images are the run's own; no test image is read.

Usage: python benchmarks/probe_draws.py WORK RUN CLASS[,CLASS...] VERSIONS[,VERSIONS...] [DRAWS]
(VERSIONS: CutPaste/Scar versions per held-out image, even; DRAWS: seeds per count, default 4)
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import progress_row, report  # noqa: E402
from cache.store import FeatureStore  # noqa: E402
from cache.stream import TrainCache  # noqa: E402
from core.layout import RunFiles  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from stages.heads import load_trained_head  # noqa: E402
from stages.heads.clad_choice import mean_ranks  # noqa: E402
from stages.heads.clad_mix import contrastive_space, fit_mix  # noqa: E402
from stages.train.probe import build_probe  # noqa: E402
from stages.train.stage import train_context  # noqa: E402


def main(work: Path, run: str, classes: list[str], counts: list[int], draws: int) -> None:
    files = RunFiles(work / "runs" / run)
    cfg = load_config(files.root / "config.toml")
    device = torch.device("cpu")
    head, _ = load_trained_head(files.final, device)
    cache = TrainCache(FeatureStore(work / "cache" / "train.zarr"))
    ctx = train_context(cfg, cache, files, device, cache.store.info().key, lambda *_: None, lambda *_: None)
    unknown = sorted(set(classes) - set(cache.class_names))
    if unknown:
        sys.exit(f"{work}: no class {', '.join(unknown)}; the cache holds {', '.join(cache.class_names)}")
    held = ctx.held & np.isin(np.asarray(cache.class_names)[cache.image_class], classes)
    second = contrastive_space(head.model, ctx)
    s = head.settings
    rows, metric = [], {}  # metric[(count, class)] = [draws x candidates]
    for count in counts:
        for draw in range(draws):
            t0 = time.perf_counter()
            # another seed draws other versions of the same held-out images (the split stays the run's)
            c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + 1000 * draw))
            probe = build_probe(c, cache, held, device, variants=count // 2, min_anomalies=0)
            ctx.probe_set = lambda p=probe: p
            head.model.set_space(second)
            mix, _ = fit_mix(head.model, "probe", s.score_mix_min_images, ctx, s.score_mix_pool, s.score_mix_space)
            pixel = [ch["probe_pixel"] for ch in mix.choices]
            for ch in mix.choices:
                metric.setdefault((count, ch["class"]), []).append(list(ch["probe_pixel"].values()))
            first = mix.choices[0]
            space = "@c" * (first["space"] == "contrastive")
            rows.append({"versions": count, "draw": draw, "chosen": f"{first['weight']}{space} ({first['chosen_on']})",
                         **{f"rank {k}": round(v, 1) for k, v in mean_ranks(pixel).items()},
                         "seconds": round(time.perf_counter() - t0, 1)})
            progress_row(rows[-1])
    for count in counts:
        rows.append({"versions": count, "draw": "spread",
                     **{name: round(float(np.std(metric[(count, name)], axis=0, ddof=1).mean()), 3)
                        for name in classes}})
    report(f"probe_draws_{work.name}_{run}", rows, work=str(work), run=run, classes=classes,
           note="chosen: the first class's candidate (weight, @c = d after the contrastive phase's adaptor); "
                "rank: pooled mean rank per candidate (1 = best); spread: std over draws of each candidate's "
                "probe pixel metric, mean over candidates")


if __name__ == "__main__":
    a = sys.argv[1:]
    if len(a) not in (4, 5):
        sys.exit(__doc__)
    main(Path(a[0]), a[1], a[2].split(","), [int(v) for v in a[3].split(",")], int(a[4]) if len(a) == 5 else 4)
