"""The bundle's models: feature extractor (ONNX), the head's scoring rule, routing and verdicts."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from clad_run.bundle import Bundle, BundleError
from clad_run.knn import KnnBank, RoutedKnn, k_nearest, pairwise
from clad_run.maps import anomaly_maps, image_scores
from clad_run.preprocess import to_network_input

OOD = "out-of-distribution"


def session(path: Any) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class FeatureExtractor:
    """``[n, S, S, 3]`` float32 in [0, 1] -> ``[n, H*W, C]`` float32 patch features
    (rounded as the cache stores them)."""

    def __init__(self, bundle: Bundle):
        m = bundle.manifest
        self.pre, self.spec = m["preprocessing"], m["features"]
        self.sess = session(bundle.path(self.spec["file"]))
        self.batch = int(self.spec.get("batch", 8))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for s in range(0, len(images), self.batch):
            x = to_network_input(images[s:s + self.batch], self.pre["mean"], self.pre["std"])
            out.append(self.sess.run([self.spec["output"]], {self.spec["input"]: x})[0])
        f = np.concatenate(out)
        if self.spec.get("round_to") == "float16":
            f = f.astype(np.float16)
        return f.astype(np.float32)


class OnnxRows:
    """Rule ``onnx_rows``: a graph ``[N, C] -> [N]`` applied to every patch row alone."""

    def __init__(self, bundle: Bundle, spec: dict[str, Any]):
        self.sess, self.io = session(bundle.path(spec["files"]["graph"])), spec["settings"]

    def score_maps(self, maps: np.ndarray) -> np.ndarray:
        n, hw, c = maps.shape
        rows = maps.reshape(-1, c).astype(np.float32)
        out = [self.sess.run([self.io["output"]], {self.io["input"]: rows[s:s + 65536]})[0]
               for s in range(0, len(rows), 65536)]
        return np.concatenate(out).reshape(n, hw).astype(np.float32)


class OnnxMaps:
    """Rule ``onnx_maps``: a graph ``[n, H*W, C] -> [n, H*W]`` on whole maps."""

    def __init__(self, bundle: Bundle, spec: dict[str, Any]):
        self.sess, self.io = session(bundle.path(spec["files"]["graph"])), spec["settings"]

    def score_maps(self, maps: np.ndarray) -> np.ndarray:
        out = [self.sess.run([self.io["output"]], {self.io["input"]: maps[s:s + 16].astype(np.float32)})[0]
               for s in range(0, len(maps), 16)]
        return np.concatenate(out).astype(np.float32)


class CladMix:
    """Rule ``clad_mix`` (CLAD with a score mix): a graph ``[n, H*W, C] -> [n, H*W, D + 1 + N]``
    (each image's rows in its class's d space, s, class probabilities); each image's class is
    the highest mean probability, and its score ``a s + b d + c`` with d the distance to the
    class's bank in that space (only classes with b != 0 have one)."""

    def __init__(self, bundle: Bundle, spec: dict[str, Any]):
        self.sess, self.io = session(bundle.path(spec["files"]["graph"])), spec["settings"]
        self.classes, self.dim = list(spec["classes"]), int(self.io["dim"])
        self.coef = np.array([self.io["coefficients"][c] for c in self.classes], np.float64)  # [N, 3]
        self.banks = {}
        for name, rel in spec["files"]["bank"].items():
            rows = np.ascontiguousarray(bundle.array(rel), np.float32)
            self.banks[self.classes.index(name)] = (rows, (rows * rows).sum(1))

    def score_maps(self, maps: np.ndarray, class_hint: list[str] | None = None) -> np.ndarray:
        out = []
        for s in range(0, len(maps), 16):
            parts = self.sess.run([self.io["output"]], {self.io["input"]: maps[s:s + 16].astype(np.float32)})[0]
            z, score = parts[..., :self.dim], parts[..., self.dim].astype(np.float64)
            cls = parts[..., self.dim + 1:].mean(1).argmax(1)
            for i, k in enumerate(cls):
                if int(k) in self.banks:
                    rows, sq = self.banks[int(k)]
                    d = k_nearest(np.ascontiguousarray(z[i], np.float32), rows, sq, 1)[:, 0]
                    a, b, c = self.coef[int(k)]
                    score[i] = a * score[i] + b * d + c
            out.append(score.astype(np.float32))
        return np.concatenate(out)


RULES = {"onnx_rows": OnnxRows, "onnx_maps": OnnxMaps, "knn_bank": KnnBank, "routed_knn": RoutedKnn,
         "clad_mix": CladMix}


def head_rule(bundle: Bundle) -> Any:
    spec = bundle.manifest["head"]
    if spec["rule"] not in RULES:
        raise BundleError(f"{bundle.path('manifest.json')}: scoring rule {spec['rule']!r} is unknown to this "
                          f"clad-run ({', '.join(RULES)}); install a newer clad-run")
    return RULES[spec["rule"]](bundle, {**spec, "classes": bundle.manifest["classes"]})


@dataclass(frozen=True)
class Route:
    class_name: str
    ood: bool
    confidence: float
    distance: float
    ood_limit: float


class Router:
    """Nearest training-image descriptor (mean patch feature) and the out-of-distribution test."""

    def __init__(self, bundle: Bundle):
        r = bundle.manifest["routing"]
        self.desc = bundle.array(r["files"]["descriptors"]).astype(np.float32)
        self.cls = bundle.array(r["files"]["image_class"]).astype(np.int64)
        self.names = list(bundle.manifest["classes"])
        self.ood_limit = np.array([np.inf if v is None else v for v in r["ood_limit"]], np.float64)

    def route(self, descriptors: np.ndarray) -> list[Route]:
        d = pairwise(descriptors, self.desc)
        out = []
        for row in d:
            per_class = np.array([row[self.cls == c].min() if (self.cls == c).any() else np.inf
                                  for c in range(len(self.names))])
            best = int(np.argmin(per_class))
            others = np.delete(per_class, best)
            conf = 1.0 if not len(others) or not np.isfinite(others.min()) else \
                float(1 - per_class[best] / max(others.min(), 1e-12))
            out.append(Route(self.names[best], bool(per_class[best] > self.ood_limit[best]), max(conf, 0.0),
                             float(per_class[best]), float(self.ood_limit[best])))
        return out


@dataclass(frozen=True)
class Verdicts:
    thresholds: dict[str, float]
    scales: dict[str, float]
    sources: dict[str, str]
    normalized_at: float

    def judge(self, class_name: str, score: float) -> tuple[float, str]:
        thr = self.thresholds.get(class_name)
        if thr is None or not math.isfinite(thr):
            return math.nan, "unjudged"
        z = (score - thr) / self.scales[class_name] + math.log(self.normalized_at / (1 - self.normalized_at))
        return float(1.0 / (1.0 + math.exp(-z))), "anomalous" if score > thr else "normal"


def verdicts(bundle: Bundle, overrides: dict[str, float]) -> Verdicts:
    """The manifest's thresholds, with ``--threshold CLASS=VALUE`` overrides winning class by class."""
    v = bundle.manifest["verdicts"]
    nan = float("nan")
    thr = {c: nan if x is None else float(x) for c, x in v["thresholds"].items()}
    scales = {c: nan if x is None else float(x) for c, x in v["scales"].items()}
    sources = dict(v["sources"])
    for c, value in overrides.items():
        if c not in thr:
            raise BundleError(f"--threshold {c}={value}: {c!r} is not a class of this bundle ({', '.join(thr)})")
        thr[c], sources[c] = value, "user (--threshold)"
        if not math.isfinite(scales.get(c, nan)):
            scales[c] = max(abs(value) * 0.05, 1e-6)
    return Verdicts(thr, scales, sources, float(v["normalized_at"]))


class Scorer:
    """Preprocessed images -> features -> patch scores -> maps, image scores and routes."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.features = FeatureExtractor(bundle)
        self.head = head_rule(bundle)
        self.router = Router(bundle) if bundle.manifest.get("routing") else None
        self.maps = bundle.manifest["maps"]

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Route | None]]:
        feats = self.features(images)
        patch = self.head.score_maps(feats)
        maps = anomaly_maps(patch, int(self.maps["size"]), float(self.maps["sigma"]))
        routes = self.router.route(feats.mean(1)) if self.router is not None else [None] * len(images)
        return maps, image_scores(maps), routes
