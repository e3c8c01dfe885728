"""Extraction throughput: bare backbone forward vs the whole stage on the same images.

Prints a table and writes bench-results/extract.json. "Images" are backbone
forwards (a training image counts 1 + K times: itself and its K synthesized
variants), so both numbers measure the same work.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import table, write_result  # noqa: E402
from pipeline.config import Config, DataConfig  # noqa: E402
from stages.extract.backbone import create_backbone  # noqa: E402
from stages.extract.demo_data import write_demo_dataset  # noqa: E402
from stages.extract.plan import make_plan  # noqa: E402
from stages.extract.stage import EXTRACT_THREADS, open_stores, pending_units, run_local


def bare_forward(cfg: Config, n_images: int, threads: int) -> float:
    """Images/s of the backbone alone on random input, batch as configured."""
    torch.set_num_threads(threads)
    f = cfg.features
    bb = create_backbone(f.backbone, f.layers, f.weights)
    x = torch.rand(f.batch_images, 3, f.crop, f.crop)
    bb(x)  # warm-up
    t0 = time.perf_counter()
    done = 0
    while done < n_images:
        bb(x)
        done += f.batch_images
    return done / (time.perf_counter() - t0)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="clad-bench-"))
    data = write_demo_dataset(tmp / "data", seed=0, n_train=24, n_test_good=4, n_test_defect=2,
                              classes=("weave", "grain", "washer"))
    cfg = Config(data=DataConfig(root=str(data)))
    rows = []
    for compressor in ("warm-up", "lz4", "zstd", "none"):
        c = replace(cfg, features=replace(cfg.features, compressor=compressor.replace("warm-up", "lz4")))
        plan = make_plan(c)
        st = open_stores(c, tmp / f"cache-{compressor}", plan)
        units = pending_units(plan, st)
        t0 = time.perf_counter()
        timings = run_local(c, plan, st, units, torch.device("cpu"))
        wall = time.perf_counter() - t0
        n_train, n_test = len(plan.samples["train"]), len(plan.samples["test"])
        forwards = n_train * (1 + c.synthesis.variants) + n_test
        stored = sum(s.nbytes_stored() for s in st.values())
        raw = timings.rows * c.features.embed_dim * 2
        rows.append({"compressor": compressor, "forwards": forwards, "wall_s": wall,
                     "img_per_s": forwards / wall, "decode_s": timings.decode,
                     "synthesis_s": timings.synthesis, "forward_s": timings.forward,
                     "aggregate_s": timings.aggregate, "write_s": timings.write,
                     "MB_per_image": stored / (n_train + n_test) / 1e6,
                     "compression_ratio": raw / max(stored, 1)})
    rows = rows[1:]  # the first run pays for imports and model loading
    bare1 = bare_forward(cfg, 96, EXTRACT_THREADS)
    bare2 = bare_forward(cfg, 96, 2)
    for r in rows:
        r["ratio_vs_bare"] = r["img_per_s"] / bare1
    print(table(rows))
    print(f"\nbare backbone forward: {bare1:.1f} img/s with {EXTRACT_THREADS} thread "
          f"(as extraction runs it), {bare2:.1f} img/s with 2 threads")
    path = write_result("extract", {"runs": rows, "bare_forward_img_per_s": bare1,
                                    "bare_forward_2_threads_img_per_s": bare2,
                                    "train_images": len(plan.samples["train"]),
                                    "test_images": len(plan.samples["test"])})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
