"""Run keys as they were computed before the head registry (train code 1).

Then every [train] setting sat in one flat table: a CLAD run hashed all of
them (knn settings and the verdict quantile included), a knn run a handful.
Runs trained then record such a key; recomputing it from today's settings
lets them stay current (they load, evaluate, score and calibrate) as long as
the settings they used are unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from core.settings import TRAIN_CODE_VERSION, Config, settings_hash

_KNN_SETTINGS = ("head", "holdout", "knn_coreset", "knn_k", "threshold_quantile", "seed")
_ADDED = {"score_loss": "hinge"}  # hashed only when set otherwise (as the old code did)
_CLAD_V1 = ("epochs_contrastive", "epochs_finetune", "batch_contrastive", "batch_finetune", "lr", "weight_decay",
            "adaptor_dims", "disc_hidden", "margin", "alpha", "gamma", "delta", "score_loss",
            "contrast_normals_only", "fusion_p", "gas_steps", "gas_eta", "gas_project_every", "gas_noise",
            "gas_scale", "gas_nn_factor", "use_contrastive", "use_gas", "use_las", "window_shards")


def legacy_flat_train(cfg: Config, clad_added: dict[str, Any]) -> dict[str, Any] | None:
    """The old flat [train] table for these settings (None if they use a CLAD
    setting that did not exist then at other than its older behaviour;
    ``clad_added``: each later CLAD setting's ``added`` value, given by the
    registry, which this module does not import)."""
    t = cfg.train
    clad = dataclasses.asdict(t.head_settings("clad"))
    for k in set(clad) - set(_CLAD_V1):
        if clad_added.get(k, object()) != clad.pop(k):
            return None
    knn = dataclasses.asdict(t.head_settings("knn"))
    return {"profile": t.profile, "head": t.head, **clad, "holdout": t.holdout, "pseudo_k": t.pseudo_k,
            "knn_coreset": knn["knn_coreset"], "knn_k": knn["knn_k"],
            "threshold_quantile": cfg.calibrate.quantile, "seed": t.seed}


def legacy_run_key(cfg: Config, clad_added: dict[str, Any]) -> str | None:
    """The pre-registry key of a clad or knn run with these settings (None for other heads);
    ``clad_added`` as for ``legacy_flat_train``."""
    if cfg.train.head not in ("clad", "knn"):
        return None
    if cfg.train.head == "knn":  # hashed knn's settings alone: CLAD's (newer ones included) never mattered
        t, knn = cfg.train, dataclasses.asdict(cfg.train.head_settings("knn"))
        flat = {"head": t.head, "holdout": t.holdout, "threshold_quantile": cfg.calibrate.quantile, "seed": t.seed,
                "knn_coreset": knn["knn_coreset"], "knn_k": knn["knn_k"]}
        settings: dict[str, Any] = {"code": TRAIN_CODE_VERSION, "train": {k: flat[k] for k in _KNN_SETTINGS}}
    else:
        train = legacy_flat_train(cfg, clad_added)
        if train is None:
            return None
        train = {k: v for k, v in train.items() if _ADDED.get(k, object()) != v}
        settings = {"code": TRAIN_CODE_VERSION, "labels": cfg.data.labels, "train": train}
    return settings_hash({"extract": cfg.extract_key(), **settings})
