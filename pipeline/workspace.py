"""The workspace folder: where each stage's output lives, and what state it is in."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import CladError
from pipeline.config import Config, diff_settings, load_config, settings_hash
from pipeline.locks import extraction_running


@dataclass
class StageState:
    """done | partial | stale | missing, with a reason for people."""

    stage: str
    state: str
    detail: str = ""
    progress: tuple[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {"stage": self.stage, "state": self.state, "detail": self.detail}
        if self.progress:
            d["done"], d["total"] = self.progress
        return d | self.extra


class Workspace:
    """``WORK/``: config.toml, cache/, runs/<name>/."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def config(self) -> Config:
        if not self.root.is_dir():
            raise CladError(f"{self.root}: no such workspace; create it with 'clad init {self.root} --data PATH'")
        return load_config(self.config_path)

    def run_dir(self, name: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise CladError(f"--run {name!r}: use letters, digits, '.', '_' or '-'")
        return self.root / "runs" / name

    def runs(self) -> list[str]:
        d = self.root / "runs"
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


def extract_state(ws: Workspace, cfg: Config) -> StageState:
    """State of the feature cache compared with the current configuration."""
    from cache.store import FeatureStore

    stores = [FeatureStore(ws.cache_dir / f"{sp}.zarr") for sp in ("train", "test")]
    if not any(s.exists() for s in stores):
        return StageState("extract", "missing", "run 'clad extract WORK'")
    done = total = 0
    broken: list[str] = []
    infos = []
    for s in stores:
        if not s.exists():
            return StageState("extract", "partial", "a split store is missing; run 'clad extract WORK'")
        info = s.info()
        infos.append(info)
        current = {**cfg.extract_settings(), "dataset": info.settings.get("dataset")}
        if settings_hash(current) != info.key and all(x.exists() and x.is_empty() for x in stores):
            return StageState("extract", "missing", "nothing extracted yet (an earlier 'clad extract' stopped "
                              "before its first shard); run 'clad extract WORK'")
        if settings_hash(current) != info.key:
            changes = diff_settings(info.settings, current)
            return StageState("extract", "stale", "; ".join(changes[:5]) +
                              " (re-run 'clad extract WORK --rebuild')", extra={"changes": changes})
        done += len(s.committed())
        total += len(info.plan)
        broken += [f"{s.shard_path(i).relative_to(ws.cache_dir)}: {why}" for i, why in s.incomplete().items()]
    changed = _data_changes(cfg, infos, ws.cache_dir)
    if changed:
        return StageState("extract", "stale", changed, extra={"changes": [changed]})
    pid = extraction_running(ws.root) if (broken or done < total) else ""
    if pid:  # shards being written look incomplete or missing: say so, and that the fix is to wait
        return StageState("extract", "partial", f"{done}/{total} shards; an extraction is running (pid {pid}): "
                          "wait for it to finish", (done, total), extra={"running": pid})
    if broken:
        return StageState("extract", "partial", f"{len(broken)} incomplete shard(s) ({'; '.join(broken[:3])}); "
                          "no extraction is running: run 'clad extract WORK' to re-extract them", (done, total),
                          extra={"incomplete": broken})
    if done < total:
        return StageState("extract", "partial", f"{done}/{total} shards and no extraction is running (one was "
                          "interrupted); run 'clad extract WORK' to finish", (done, total))
    return StageState("extract", "done", f"{total} shards", (done, total))


def _data_changes(cfg: Config, infos: list[Any], cache_dir: Path) -> str:
    """Why the cache no longer matches the data set on disk ("" when it does):
    images added or removed since extraction, or files modified (a copy with the
    recorded content is the same data set: ``stages.extract.plan.same_data``)."""
    from stages.extract.plan import dataset_changes

    recorded = infos[0].settings.get("dataset", "")
    cached = {i for info in infos for shard in info.plan for i in shard}
    try:
        what = dataset_changes(cfg, recorded, cached, cache_dir)
    except CladError as exc:
        return f"the data set cannot be read: {exc}"
    if not what:
        return ""
    return (f"the data set changed since extraction ({what} under {cfg.data.root}); the cache, and every run "
            "trained on it, holds the old data set: run 'clad extract WORK --rebuild' to re-extract it "
            "(or restore the data set as it was)")
