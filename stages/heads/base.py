"""The Head interface: what every head declares and does.

A head turns cached patch features into anomaly scores. Its module declares
a settings dataclass (a ``core.schema.Settings``, each field declared with
``setting``; only those settings, plus the run-level ones it names in
``reads``, enter its run key), profiles, how it trains from the cache
(resumable), how it saves and loads its state (weights_only checkpoints) and
how it scores whole feature maps. Every checkpoint stores the head's settings
as the dataclass holds them (``checkpoint_meta``) and reads them back with
``settings_from_meta``. Training, evaluation, calibration, scoring and status
only ever talk to this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from core.errors import CladError
from core.layout import RunFiles
from core.schema import from_record, record
from cache.stream import TrainCache
from stages.train.context import TrainContext
from stages.train.probe import ProbeSize


@dataclass
class ExportContext:
    """Where and with what a head writes its part of a deploy bundle (``Head.export``)."""

    root: Path  # the bundle folder being written
    folder: str  # the head's sub-folder of it ("head")
    class_names: list[str]
    image_class: np.ndarray  # [training images of the cache] class index of each
    written: list[str] = field(default_factory=list)  # bundle-relative paths, in order

    def save(self, name: str, array: np.ndarray) -> str:
        """``array`` as ``folder/name.npy``; returns its bundle-relative path."""
        rel = f"{self.folder}/{name}.npy"
        (self.root / self.folder).mkdir(parents=True, exist_ok=True)
        np.save(self.root / rel, np.ascontiguousarray(array), allow_pickle=False)
        self.written.append(rel)
        return rel

    def onnx(self, module: torch.nn.Module, example: torch.Tensor, name: str, dynamic: dict[int, str],
             input_name: str = "features", output_name: str = "scores") -> tuple[str, dict[str, Any]]:
        """``module`` as the graph ``folder/name.onnx``; returns its path and description."""
        from stages.heads.onnx_graph import write_onnx

        rel = f"{self.folder}/{name}.onnx"
        info = write_onnx(module, example, self.root / rel, input_name, output_name, dynamic)
        self.written.append(rel)
        return rel, info


class Head(ABC):
    """One registered head (see ``stages.heads.registry.register_head``)."""

    name: ClassVar[str]
    settings_class: ClassVar[type]
    profiles: ClassVar[dict[str, dict[str, Any]]] = {}
    reads: ClassVar[tuple[str, ...]] = ("holdout", "seed")  # run-level settings in the run key
    uses_labels: ClassVar[bool] = False  # does data.labels (classes | pseudo) change what it learns?
    # settings added after runs existed -> the older behaviour: derived by register_head from the
    # fields' setting(added=...) declarations (read it, never write it)
    added: ClassVar[dict[str, Any]] = {}
    # checkpoints written before meta["settings"] kept some settings at the top of meta, a few under
    # another name: {old meta key: setting} (the same name needs no entry)
    older_meta: ClassVar[dict[str, str]] = {}
    distributed: ClassVar[bool] = False  # can it train on several processes (torchrun; core.distributed)?
    cross_fits: ClassVar[bool] = False  # calibration_scores scores every image unseen (with folds >= 2)?
    summary: str = ""  # one line for --help
    settings: Any  # the head's settings (an instance of settings_class)
    meta: dict[str, Any]  # what checkpoint() stores besides the state: head, embed_dim, class_names, keys, ...

    # -- training ---------------------------------------------------------------
    @classmethod
    @abstractmethod
    def fit(cls, settings: Any, ctx: TrainContext) -> tuple[Head, dict[str, Any]]:
        """Train on the cache (resuming from ``ctx.files.latest`` if present) and
        return the ready head and a JSON-able summary (history, sizes, ...)."""

    @classmethod
    def progress(cls, files: RunFiles) -> tuple[int, int] | None:
        """(units done, units in all) of an unfinished training, for ``clad status``.

        Default: the ``progress`` pair that ``stages.train.epochs`` stores in every
        ``latest.pt``; None where there is none or it cannot be read.
        """
        if not files.latest.is_file():
            return None
        try:
            ck = torch.load(files.latest, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a checkpoint being replaced right now, or damaged
            return None
        pr = ck.get("progress")
        return (int(pr[0]), int(pr[1])) if pr is not None else None

    @classmethod
    def probe_size(cls, settings: Any) -> ProbeSize:
        """CutPaste/Scar probe images per class, and versions of each held-out image, that
        training with ``settings`` reads, at least (``stages.train.probe.probe_size``); 0 = the
        default probe (every held-out image's first versions, which is what epochs are selected on)."""
        return ProbeSize(0, 0)

    # -- state --------------------------------------------------------------------
    @abstractmethod
    def checkpoint(self) -> dict[str, Any]:
        """Everything needed to score again, as tensors and plain values
        (``torch.load(weights_only=True)`` must read it back). Must hold
        ``meta`` with at least ``head``, ``embed_dim`` and ``class_names``."""

    @classmethod
    @abstractmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], device: torch.device) -> Head:
        """Rebuild the head from ``checkpoint()``'s dict (also older runs' files)."""

    def attach_cache(self, cache: Callable[[], TrainCache]) -> None:
        """A run that refers to its training cache instead of copying it (a memory-bank head
        keeps which rows it chose, not the rows) reads them through ``cache``, which opens the
        run's cache after checking that it is the one the run was trained on. Default: the
        head needs nothing from the cache after training."""

    def checkpoint_meta(self) -> dict[str, Any]:
        """``meta`` with the head's settings, from the dataclass itself (``core.schema.record``)."""
        return {**self.meta, "settings": record(self.settings)}

    @classmethod
    def settings_from_meta(cls, meta: dict[str, Any]) -> Any:
        """The settings a checkpoint's ``meta`` stores; settings it lacks take their
        ``added`` value (they came later), then their default. A checkpoint written
        before ``meta["settings"]`` gives what it kept at the top of ``meta``."""
        values = meta.get("settings")
        if values is None:
            own = {f.name for f in fields(cls.settings_class)}
            values = {cls.older_meta.get(k, k): v for k, v in meta.items() if cls.older_meta.get(k, k) in own}
        return from_record(cls.settings_class, values, f"{cls.name} checkpoint")

    # -- deploy -----------------------------------------------------------------
    def export(self, ctx: ExportContext) -> dict[str, Any]:
        """Write the head's part of a deploy bundle through ``ctx`` (an ONNX graph where the
        head is a network, ``.npy`` arrays where it is data) and return its manifest entry:
        ``rule`` (a scoring rule the runtime ``clad_run`` implements: onnx_rows, onnx_maps,
        knn_bank, routed_knn), ``settings`` and ``files`` (bundle-relative paths)."""
        raise CladError(f"head {self.name!r} cannot be exported yet (it does not implement Head.export)")

    # -- scoring ----------------------------------------------------------------
    @abstractmethod
    def score_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """``[n, H*W, C_d]`` float32 patch features of n whole images -> ``[n, H*W]``
        anomaly scores (high = anomalous), on the CPU. Row-wise heads score each
        row alone; reconstruction heads need the whole map."""

    def calibration_scores(self, ctx: TrainContext, folds: int = 5) -> tuple[dict[int, np.ndarray], set[int]]:
        """Patch scores ``{image index: [H*W]}`` of normal training images for
        verdict calibration, and which of them the scoring model never saw.

        Default: every training image, scored by the trained model; only the
        held-out ones are unseen (``stages.train.calibrate`` reports the gap between
        the two groups as evidence). A head that can refit cheaply overrides
        this with cross-fitting, so that every image is unseen.
        """
        from stages.train.labels import normal_maps

        maps = normal_maps(ctx.cache, np.ones(len(ctx.held), bool))
        scores = {i: self.score_maps(torch.from_numpy(m[None].astype(np.float32)))[0].numpy()
                  for i, m in maps.items()}
        return scores, {int(i) for i in np.nonzero(ctx.held)[0]}
