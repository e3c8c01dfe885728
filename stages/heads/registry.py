"""The head registry: one decorator, one front door (after timm's
``register_model`` / ``create_model``), and the run keys built from it.

A run's key hashes the extraction key, the head's name, the run-level
settings the head declares it ``reads`` (and ``data.labels`` if it
``uses_labels``) and the head's own settings, so editing a knn setting never
makes a CLAD run stale and vice versa.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from core.errors import CladError
from core.files import load_safely
from core.settings import HEADS, RUN_CODE_VERSION, Config, HeadSpec, diff_settings, settings_hash
from stages.heads.base import Head

_REGISTRY: dict[str, type[Head]] = {}


def register_head(cls: type[Head]) -> type[Head]:
    """Class decorator: make a head available under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"head {cls.name!r} registered twice ({_REGISTRY[cls.name]} and {cls})")
    _REGISTRY[cls.name] = cls
    HEADS[cls.name] = HeadSpec(cls.name, cls.settings_class, dict(cls.profiles), dict(cls.added))
    return cls


def head_names() -> list[str]:
    return list(_REGISTRY)


def head_class(name: str) -> type[Head]:
    """The registered head called ``name``; an unknown name is refused with the list."""
    if name not in _REGISTRY:
        raise CladError(f"unknown head {name!r}; registered heads: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def run_settings(cfg: Config, keyed: bool = True) -> dict[str, Any]:
    """What a run of ``cfg.train.head`` depends on besides the feature cache.
    ``keyed=False`` keeps later-added settings at their defaults too (diffs)."""
    cls = head_class(cfg.train.head)
    own = dataclasses.asdict(cfg.train.head_settings())
    if keyed:
        own = {k: v for k, v in own.items() if k not in cls.added or cls.added[k] != v}
    common: dict[str, Any] = {k: getattr(cfg.train, k) for k in cls.reads}
    if cls.uses_labels:
        common["labels"] = cfg.data.labels
    return {"code": RUN_CODE_VERSION, "head": cls.name, "run": common, cls.name: own}


def run_key(cfg: Config) -> str:
    return settings_hash({"extract": cfg.extract_key(), **run_settings(cfg)})


def accepted_run_keys(cfg: Config) -> tuple[str, ...]:
    """The run key, and the key the same settings had before the head
    registry (runs trained then stay current)."""
    from stages.heads.legacy import legacy_run_key

    legacy = legacy_run_key(cfg)
    return (run_key(cfg),) + ((legacy,) if legacy else ())


def run_changes(old: Config, new: Config) -> list[str]:
    """Settings that differ between the run's recorded configuration and the
    current one, as ``section.name: old -> new`` lines."""
    a = old.extract_settings() | {"train": run_settings(old, keyed=False)}
    b = new.extract_settings() | {"train": run_settings(new, keyed=False)}
    return diff_settings(a, b)


def load_trained_head(final_path: Any, device: torch.device) -> tuple[Head, dict[str, Any]]:
    """A finished run's head from ``final.pt`` (any registered head, older runs
    included) and its metadata."""
    from pathlib import Path

    final_path = Path(final_path)
    if not final_path.is_file():
        raise CladError(f"{final_path}: no trained model; run 'clad train WORK --run {final_path.parents[1].name}'")
    run = final_path.parents[1].name
    ckpt = load_safely(final_path, "a clad checkpoint", f"retrain with 'clad train WORK --run {run} --restart'")
    if not isinstance(ckpt, dict) or "meta" not in ckpt:
        raise CladError(f"{final_path}: not a clad checkpoint (no 'meta'); retrain with "
                        f"'clad train WORK --run {run} --restart'")
    meta = ckpt["meta"]
    head = head_class(meta.get("head", "clad")).from_checkpoint(ckpt, device)
    return head, meta
