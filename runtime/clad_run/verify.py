"""Parity of a bundle with the training-side (torch) path on the golden images it carries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clad_run.bundle import Bundle
from clad_run.scoring import Scorer, verdicts

SCORE_TOLERANCE = 1e-3  # relative to the golden set's largest |score|
# Relative to the golden maps' largest |value|. Looser than scores on purpose: features are rounded to
# float16 as the cache stores them, and onnxruntime's float32 sums differ from torch's in the last bits, so
# about 1 % of feature values round to the neighbouring float16; where a head searches approximately
# (routed_knn: projected candidates, refinement of the top patches) a few patches then find another
# candidate (tiny set: 16 of 6,272 patches, 1.5e-3 of the map's range), while image scores agree to 1e-6.
MAP_TOLERANCE = 1e-2


def golden_parity(root: str | Path, scorer: Scorer | None = None) -> dict[str, Any]:
    """Score the golden images with the bundle; compare raw scores, maps and verdicts with the torch path's."""
    bundle = scorer.bundle if scorer is not None else Bundle(root)
    scorer = scorer or Scorer(bundle)
    g = bundle.manifest["golden"]
    images = bundle.array(g["files"]["images"]).astype(np.float32) / 255.0
    ref_scores = bundle.array(g["files"]["scores"]).astype(np.float64)
    ref_maps = bundle.array(g["files"]["maps"]).astype(np.float64)
    maps, scores, _ = scorer(images)
    v = verdicts(bundle, {})
    ours = [v.judge(c, float(s))[1] for c, s in zip(g["classes"], scores, strict=True)]
    score_diff = float(np.abs(scores - ref_scores).max())
    map_diff = float(np.abs(maps - ref_maps).max())
    score_scale = float(max(np.abs(ref_scores).max(), 1e-12))
    map_scale = float(max(np.abs(ref_maps).max(), 1e-12))
    agree = sum(a == b for a, b in zip(ours, g["torch_verdicts"], strict=True))
    rel_s, rel_m = score_diff / score_scale, map_diff / map_scale
    return {"images": len(images), "max_score_diff": score_diff, "max_score_rel_diff": rel_s,
            "max_map_diff": map_diff, "max_map_rel_diff": rel_m, "verdicts_agree": agree,
            "verdicts_differ": len(ours) - agree,
            "ok": bool(rel_s <= SCORE_TOLERANCE and rel_m <= MAP_TOLERANCE and agree == len(ours)),
            "tolerance": {"score_rel": SCORE_TOLERANCE, "map_rel": MAP_TOLERANCE}}
