"""What the crc32c checksum on every cache chunk costs at write and read time.

One train shard's arrays (16 images x 3 (normal + 2 synthetic) x 784 rows,
C_d = 360 float16, about 27 MB; or the first shard of ``--store PATH``, a
real ``train.zarr``) are written as ``FeatureStore.write_shard`` lays them
out, with and without the crc32c codec, per compressor, and read back.
Median of ``--repeat`` runs. Prints a table and writes
bench-results/checksum_cost.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import table, write_result  # noqa: E402
from cache.store import ROW_CHUNK, compressors  # noqa: E402


def synthetic_shard(rows: int, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = np.maximum(rng.standard_normal((rows, dim), np.float32) * 0.5 + 0.2, 0).astype(np.float16)
    return {"features": feats, "class_id": np.zeros(rows, np.int16),
            "anomaly": (rng.random(rows) < 0.3).astype(np.uint8), "image": np.repeat(np.arange(rows // 784 + 1),
                                                                                     784)[:rows].astype(np.int32),
            "yx": rng.integers(0, 28, (rows, 2)).astype(np.int16), "pair": np.full(rows, -1, np.int32),
            "beta": np.ones(rows, np.float16)}


def write(path: Path, arrays: dict[str, np.ndarray], codec: list | None, crc: bool) -> None:
    g = zarr.open_group(str(path), mode="w-")
    for name, arr in arrays.items():
        chunks = (max(1, min(ROW_CHUNK, arr.shape[0])),) + arr.shape[1:]
        chain = [*(codec if codec and arr.ndim >= 2 else []), *([Crc32cCodec()] if crc else [])]
        g.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=chunks, compressors=chain or None)[...] = arr


def read(path: Path) -> None:
    g = zarr.open_group(str(path), mode="r")
    for name in g.array_keys():
        g[name][...]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=None, help="a real train.zarr: use its first shard")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if args.store:
        g = zarr.open_group(str(args.store / "shards" / "00000"), mode="r")
        arrays = {n: g[n][...] for n in g.array_keys()}
    else:
        arrays = synthetic_shard(16 * 3 * 784, 360)
    mb = sum(a.nbytes for a in arrays.values()) / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cname in ("lz4", "zstd", "none"):
            codec = compressors(cname, 5 if cname == "lz4" else 3)
            res = {}
            for crc in (False, True):
                w, r = [], []
                for k in range(args.repeat):
                    p = Path(tmp) / f"{cname}-{crc}-{k}"
                    t0 = time.perf_counter()
                    write(p, arrays, codec, crc)
                    w.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    read(p)
                    r.append(time.perf_counter() - t0)
                    shutil.rmtree(p)
                res[crc] = (float(np.median(w)), float(np.median(r)))
            rows.append({"compressor": cname, "MB": round(mb, 1),
                         "write_ms": round(res[False][0] * 1e3, 1), "write_crc_ms": round(res[True][0] * 1e3, 1),
                         "write_extra_%": round(100 * (res[True][0] / res[False][0] - 1), 1),
                         "read_ms": round(res[False][1] * 1e3, 1), "read_crc_ms": round(res[True][1] * 1e3, 1),
                         "read_extra_%": round(100 * (res[True][1] / res[False][1] - 1), 1)})
    print(table(rows))
    print(f"written to {write_result('checksum_cost', {'source': str(args.store or 'synthetic'), 'rows': rows})}")


if __name__ == "__main__":
    main()
