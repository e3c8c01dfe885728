"""Training throughput streamed from Zarr vs from memory, and peak RSS vs cache size.

For each batch size (8,000 and 100,000 rows) the same optimizer steps run
(1) on batches streamed from a cache and (2) on batches taken from the whole
cache already in memory. Peak RSS is measured in a fresh subprocess per
configuration for a small cache and one 10x larger. Prints a table and
writes bench-results/train_stream.json.

``--dim 1536 --batches 100000`` measures the feature width of a WideResNet-50
cache (docs/METHOD.md's C_d) instead of lite0's 360 (small cache, streamed only),
written to train_stream_dim1536.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import table, write_result  # noqa: E402
from cache.store import FeatureStore, compressors  # noqa: E402
from cache.stream import BatchStream, TrainCache  # noqa: E402
from stages.heads.clad_model import CladModel  # noqa: E402
from stages.train.losses import classification_loss, hinge_loss  # noqa: E402

ROWS_PER_IMAGE = 784


def synthetic_cache(path: Path, n_images: int, dim: int, shard_images: int = 16) -> FeatureStore:
    """A train store with the real layout, filled with random features (fast to make)."""
    st = FeatureStore(path)
    plan = [[f"c{j % 3}/train/good/{j:05d}" for j in range(i, min(i + shard_images, n_images))]
            for i in range(0, n_images, shard_images)]
    st.create_or_validate("bench", {"features": {"embed_dim": dim}}, plan, ["c0", "c1", "c2"])
    rng = np.random.default_rng(0)
    offset = 0
    for s, ids in enumerate(plan):
        n_norm = len(ids) * ROWS_PER_IMAGE
        n_anom = n_norm // 4
        img = np.repeat(np.arange(offset, offset + len(ids)), ROWS_PER_IMAGE).astype(np.int32)
        offset += len(ids)
        arrays = {
            "features": rng.standard_normal((n_norm + n_anom, dim)).astype(np.float16),
            "class_id": np.zeros(n_norm + n_anom, np.int16),
            "anomaly": np.r_[np.zeros(n_norm, np.uint8), np.ones(n_anom, np.uint8)],
            "image": np.r_[img, img[:n_anom]],
            "yx": np.zeros((n_norm + n_anom, 2), np.int16),
            "pair": np.r_[np.full(n_norm, -1, np.int32), np.arange(n_anom, dtype=np.int32)],
            "beta": np.full(n_norm + n_anom, 0.5, np.float16),
        }
        st.write_shard(s, arrays, {}, compressors("lz4", 5))
    return st


def run_steps(cache_path: Path, batch: int, steps: int, in_memory: bool) -> dict[str, float]:
    torch.manual_seed(0)
    cache = TrainCache(FeatureStore(cache_path))
    excluded = np.zeros(len(cache.image_ids), bool)
    stream = BatchStream(cache, batch // 2, batch // 4, 0, excluded, window=4)
    model = CladModel(cache.embed_dim, 3, (1024, 512, 256), 1024)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    batches = []
    if in_memory:  # everything decoded up front: the step rate without any streaming
        it = stream.epoch(0)
        batches = [next(it) for _ in range(min(steps, stream.batches_per_epoch))]
    t0 = time.perf_counter()
    done = 0
    epoch = 0
    while done < steps:
        source = batches if in_memory else stream.epoch(epoch)
        for b in source:
            x = torch.cat([b.normal, b.anomaly])
            y = torch.cat([torch.zeros(len(b.normal), dtype=torch.long),
                           torch.full((len(b.anomaly),), 3)])
            _, logits, s = model(x)
            loss = classification_loss(logits, y) + hinge_loss(s, y == 3)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
        epoch += 1
    dt = time.perf_counter() - t0
    rows = done * (stream.n_normal + stream.n_anomaly)
    return {"steps_per_s": done / dt, "rows_per_s": rows / dt,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":  # one measurement in a fresh process
        _, _, path, batch, steps, mode = sys.argv
        print(json.dumps(run_steps(Path(path), int(batch), int(steps), mode == "memory")))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=360, help="feature width C_d of the synthetic cache")
    ap.add_argument("--batches", default="8000,100000", help="comma-separated batch sizes")
    args = ap.parse_args()
    full = args.dim == 360  # the standard run: both cache sizes, streamed and in memory
    tmp = Path(tempfile.mkdtemp(prefix="clad-bench-stream-"))
    stores = {"small": synthetic_cache(tmp / "small.zarr", 160, args.dim)}  # 125k normal rows
    if full:
        stores["10x"] = synthetic_cache(tmp / "large.zarr", 1600, args.dim)  # 1.25M normal rows
    rows = []
    for batch in map(int, args.batches.split(",")):
        steps = 20 if batch <= 10000 else 4
        for name, st in stores.items():
            for mode in ("stream", "memory") if full else ("stream",):
                if mode == "memory" and name == "10x":
                    continue  # the in-memory baseline is the step rate; one cache size suffices
                out = subprocess.run([sys.executable, __file__, "--child", str(st.path), str(batch), str(steps),
                                      mode], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append({"dim": args.dim, "batch": batch, "cache": name, "mode": mode, **r})
    for r in rows:
        base = next((x for x in rows if x["batch"] == r["batch"] and x["mode"] == "memory"), None)
        r["vs_memory"] = r["steps_per_s"] / base["steps_per_s"] if base else float("nan")
    print(table(rows))
    cache_mb = {n: s.nbytes_stored() / 2**20 for n, s in stores.items()}
    print("\ncache sizes: " + ", ".join(f"{n} {v:.0f} MiB" for n, v in cache_mb.items()))
    name = "train_stream" if full else f"train_stream_dim{args.dim}"
    path = write_result(name, {"runs": rows, "cache_mib": cache_mb})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
