"""Where a CLAD training step's time goes, on a real cache (CPU or CUDA).

Times, per batch of the fast profile's sizes: reading and decoding the batch
from the cache (the stream, here without its prefetch thread), the GAS
ascent, the forward/backward of the losses without and with the contrastive
terms, and one probe evaluation per epoch. Prints a table and writes
bench-results/clad_step.json.

Usage: python benchmarks/clad_step.py WORK [--batch 2000] [--gas-steps 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import report  # noqa: E402
from cache.store import FeatureStore  # noqa: E402
from cache.stream import BatchStream, TrainCache  # noqa: E402
from stages.heads.clad_model import CladModel  # noqa: E402
from stages.train.labels import holdout_images  # noqa: E402
from stages.train.losses import (  # noqa: E402
    classification_loss,
    contrastive_loss,
    global_synthesis,
    hinge_loss,
    variance_loss,
)


def timed(f, repeats: int) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--gas-steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    cache = TrainCache(FeatureStore(a.work / "cache" / "train.zarr"))
    held = holdout_images(cache, 0.05, 0)
    n = len(cache.class_names)
    stream = BatchStream(cache, a.batch // 2, a.batch // 4, 0, held, 4, mix_classes=True, prefetch=1)
    it = iter(stream._produce(0))  # the producer alone: read, decode, shuffle, cut
    t_stream = timed(lambda: stream._to_batch(next(it)), a.repeats)
    b = stream._to_batch(next(it))
    model = CladModel(cache.embed_dim, n, (1024, 512, 256), 1024)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    xn = b.normal
    y = torch.randint(0, n, (len(xn),))
    x = torch.cat([xn, b.anomaly, xn[: len(xn) // 2]])
    yy = torch.cat([y, torch.full((len(x) - len(xn),), n)])

    def gas() -> None:
        global_synthesis(model, xn[: len(xn) // 2], 30.0, 30.0 / cache.embed_dim ** 0.5, 0.06, a.gas_steps,
                         a.gas_steps, "eval")

    def step(contrastive: bool) -> None:
        z, logits, s = model(x)
        loss = classification_loss(logits, yy) + hinge_loss(s, yy == n)
        if contrastive:
            loss = loss + contrastive_loss(z, yy) + variance_loss(z, yy)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rows = [{"part": "stream: read + decode one batch", "ms": 1000 * t_stream},
            {"part": f"GAS: {a.gas_steps} ascent steps on {len(xn) // 2} rows", "ms": 1000 * timed(gas, a.repeats)},
            {"part": f"forward/backward, L_c + L_d, {len(x)} rows", "ms": 1000 * timed(lambda: step(False), a.repeats)},
            {"part": f"forward/backward with L_contrast + L_var, {len(x)} rows",
             "ms": 1000 * timed(lambda: step(True), a.repeats)}]
    for r in rows:
        r["ms"] = round(r["ms"], 1)
    report("clad_step", rows, work=str(a.work), batch=a.batch, gas_steps=a.gas_steps,
           threads=torch.get_num_threads(), rows_per_batch=int(len(x)), np_version=np.__version__)


if __name__ == "__main__":
    main()
