"""The head registry: one decorator, one front door (after timm's
``register_model`` / ``create_model``), the head table the configuration
reads (``HEADS``), and the run keys built from it.

A run's key hashes the extraction key, the head's name, the run-level
settings the head declares it ``reads`` (and ``data.labels`` if it
``uses_labels``) and the head's own settings, so editing a knn setting never
makes a CLAD run stale and vice versa.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cache.stream import TrainCache
from core.errors import CladError
from core.files import load_safely
from core.layout import RunFiles
from core.schema import Settings, added_values
from core.schema import keyed as keyed_values
from core.settings import RUN_CODE_VERSION, Config, diff_settings, settings_hash
from stages.heads.base import Head

_REGISTRY: dict[str, type[Head]] = {}


@dataclass(frozen=True)
class HeadSpec:
    """What the configuration needs to know of a registered head: its settings
    dataclass, the settings' values per profile, and the settings added after
    runs existed with the value that reproduces the older behaviour (hashed
    only when set otherwise; declared on the fields, ``setting(added=...)``)."""

    name: str
    settings: type
    profiles: dict[str, dict[str, Any]]
    added: dict[str, Any]

    def defaults(self, profile: str) -> Any:
        """The head's settings under a profile (a profile it does not name = the defaults)."""
        return dataclasses.replace(self.settings(), **self.profiles.get(profile, {}))


# head name -> spec, in registration order: the head table of [train.<head>] (core.settings.head_table)
HEADS: dict[str, HeadSpec] = {}


def register_head(cls: type[Head]) -> type[Head]:
    """Class decorator: make a head available under ``cls.name``.

    Its settings class gets its config.toml table (``train.<name>``, named
    in its error messages) and the head its ``added`` dict, derived from the
    fields' ``added=`` declarations (a hand-written ``added`` is refused: one
    place per setting)."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"head {cls.name!r} registered twice ({_REGISTRY[cls.name]} and {cls})")
    settings = cls.settings_class
    if not (isinstance(settings, type) and issubclass(settings, Settings) and dataclasses.is_dataclass(settings)):
        raise ValueError(f"head {cls.name!r}: settings_class must be a dataclass of core.schema.Settings")
    if "added" in vars(cls):
        raise ValueError(f"head {cls.name!r}: declare older values on the settings' fields "
                         "(setting(..., added=VALUE)), not in a class 'added' dict")
    settings.table = f"train.{cls.name}"
    cls.added = added_values(settings)
    _REGISTRY[cls.name] = cls
    HEADS[cls.name] = HeadSpec(cls.name, settings, dict(cls.profiles), dict(cls.added))
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
    settings = cfg.train.head_settings()
    own = keyed_values(settings) if keyed else dataclasses.asdict(settings)
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

    legacy = legacy_run_key(cfg, HEADS["clad"].added)
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
    head.attach_cache(run_cache(RunFiles(final_path.parents[1]), meta.get("cache_key")))
    return head, meta


def run_cache(files: RunFiles, key: str | None) -> Callable[[], TrainCache]:
    """Opens the run's training cache on first call (then the same one), after checking
    that it is still the cache the run was trained on (``key``): a run that refers to
    its cache is valid exactly as long as that cache is."""
    opened: list[TrainCache] = []

    def cache() -> TrainCache:
        if not opened:
            from cache.store import FeatureStore

            store = FeatureStore(files.train_cache)
            retrain = f"re-train with 'clad train WORK --run {files.name} --restart' (or score its export bundle)"
            if not store.exists():
                raise CladError(f"{files.train_cache}: missing, and run {files.name!r} reads its memory bank "
                                f"from it; run 'clad extract WORK', then {retrain}")
            if key is not None and store.info().key != key:
                raise CladError(f"{files.train_cache}: rebuilt since run {files.name!r} was trained (cache key "
                                f"{store.info().key[:12]}, the run's {key[:12]}), and the run reads its memory "
                                f"bank from it; {retrain}")
            opened.append(TrainCache(store))
        return opened[0]

    return cache
