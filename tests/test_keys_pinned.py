"""Cache and run keys are pinned: a workspace extracted and trained by an
earlier version stays current after a refactor.

``keys_pinned.json`` holds the keys that the code of commit e131125 computed
for the configurations below (written by ``python tests/test_keys_pinned.py``
on that commit, never regenerated since). A change that moves a key must bump
a code version on purpose (``core.settings``), and rewrite the file with a
commit message that says why; a refactor never may.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

PINS = Path(__file__).with_name("keys_pinned.json")
ROOT = "/data/demo"  # the data root recorded in every configuration below (keys hash it)

# CLAD at the behaviour of runs trained before its later settings: the only
# configurations whose pre-registry (flat-table) keys are accepted too
OLDER_CLAD = ["clad.mix_classes=false", "clad.gas_bn=train", "clad.gas_radius=global", "clad.fusion_beta=stored",
              "clad.bn_refresh=false"]
# One changed setting per case, for every head and section: a key that only
# depends on the defaults would let a changed field's path (hashing, 'older'
# values, profiles) drift unseen.
SETS: dict[str, list[list[str]]] = {
    "clad": [["lr=1e-3"], ["score_loss=bce"], ["score_loss=hinge"], ["mix_classes=false"], ["gas_bn=train"],
             ["gas_radius=global"], ["fusion_beta=stored"], ["bn_refresh=false"], ["bn_rows=1000"],
             ["adaptor_dims=[64, 32]"], ["use_gas=false"], ["epochs_finetune=3"],
             [*OLDER_CLAD], [*OLDER_CLAD, "score_loss=bce"]],
    "knn": [["knn_k=3"], ["knn_coreset=0.5"], [*OLDER_CLAD], [*OLDER_CLAD, "knn_k=3"]],
    "routed_knn": [["images=8"], ["select=mean"], ["project=0"], ["refine=0.0"], ["knn_k=2"], ["route=false"],
                   ["rerank=2"], ["select=mean", "project=0", "refine=0.0"]],
    "rlr": [["epochs=3"], ["ccl=classes"], ["mix_classes=false"], ["error=l2"], ["dim=64"]],
    "*": [["holdout=0.1"], ["seed=3"], ["pseudo_k=4"], ["data.labels=pseudo"], ["features.crop=0"],
          ["features.backbone=tf_efficientnet_lite1"], ["synthesis.variants=1"], ["evaluate.sigma=2"],
          ["threshold_quantile=0.95"], ["calibrate.folds=3"]],
}


def compute_keys() -> dict[str, Any]:
    """Keys of an init-style workspace config (profile fast, as 'clad init' writes it)
    and of a bare ``Config()``, for every head, profile and one-setting change."""
    import tomllib

    from pipeline.config import apply_sets, config_from_dict, config_to_dict, dump_toml, with_run_choices
    from stages.heads import accepted_run_keys, head_names, run_key
    from stages.train.calibrate import calibration_key

    out: dict[str, Any] = {}
    for base_name, raw in (("init", {"data": {"root": ROOT}, "train": {"profile": "fast"}}), ("bare", {})):
        base = config_from_dict(raw)
        out[f"{base_name}/extract"] = base.extract_key()
        for head in head_names():
            for profile in ("fast", "long", "paper"):
                cases = [[]] + (SETS.get(head, []) + SETS["*"] if profile == "fast" else [])
                for sets in cases:
                    cfg = apply_sets(with_run_choices(base, profile, head), sets)
                    key = run_key(cfg)
                    saved = config_from_dict(tomllib.loads(dump_toml(config_to_dict(cfg))))  # a run's config.toml
                    name = f"{base_name}/{head}/{profile}/{'+'.join(sets) or 'default'}"
                    out[name] = {"extract": cfg.extract_key(), "run": key, "accepted": list(accepted_run_keys(cfg)),
                                 "evaluate": cfg.evaluate_key(key), "calibrate": calibration_key(cfg, key),
                                 "saved_run": run_key(saved)}
    return out


def test_keys_of_existing_workspaces_are_unchanged():
    pinned = json.loads(PINS.read_text())
    now = compute_keys()
    assert len(pinned) > 100  # the file is the real one, not an empty stand-in
    changed = sorted(k for k in pinned if now.get(k) != pinned[k])
    assert not changed, f"{len(changed)} keys moved, e.g. {changed[:3]}: {[now.get(k) for k in changed[:1]]}"
    assert set(now) == set(pinned)


if __name__ == "__main__":  # pragma: no cover - run once, on the commit the pins come from
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    PINS.write_text(json.dumps(compute_keys(), indent=1, sort_keys=True) + "\n")
