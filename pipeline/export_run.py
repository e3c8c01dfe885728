"""``clad export``: checks and summary around ``stages.evaluate.export``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from core.errors import CladError
from core.layout import RunFiles
from pipeline.eval_run import calibrate_cli, trained_config
from pipeline.progress import say
from pipeline.workspace import Workspace


def export_cli(ws: Workspace, name: str, out: Path) -> None:
    from cache.store import FeatureStore
    from cache.stream import TrainCache
    from stages.evaluate.export import check_out, export_run
    from stages.train.calibrate import ensure_calibrated
    from stages.train.labels import holdout_images

    check_out(out)
    cfg, key = trained_config(ws, name)
    calibrate_cli(ws, name, "cpu", force=False)  # a missing or stale calibration is redone first
    files = RunFiles(ws.run_dir(name))
    ensure_calibrated(cfg, files, key)
    train_store = ws.cache_dir / "train.zarr"
    if not train_store.is_dir():
        raise CladError(f"{train_store}: missing; run 'clad extract {ws.root}'")
    cache = TrainCache(FeatureStore(train_store))
    held = holdout_images(cache, cfg.train.holdout, cfg.train.seed)
    held_ids = {cache.image_ids[i] for i in np.nonzero(held)[0]}
    t0 = time.perf_counter()
    m = export_run(cfg, files, out, cache.image_class, say, held_ids)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    par = m["parity"]
    say(f"export: run {name!r} ({m['head_name']}) -> {out} ({size / 2**20:.1f} MiB, {len(m['files'])} files) in "
        f"{time.perf_counter() - t0:.1f} s")
    say(f"export: parity on {par['images']} golden images: max score difference {par['max_score_diff']:.3g} "
        f"(relative {par['max_score_rel_diff']:.3g}), max map difference {par['max_map_diff']:.3g}, "
        f"verdicts agree {par['verdicts_agree']}/{par['images']}" + ("" if par["ok"] else "  ** OUTSIDE TOLERANCE **"))
