"""Benchmark: a deploy bundle against the training-side scorer (issue 21).

Exports the run (``clad export``), then scores the same images with
``clad score`` (torch) and ``clad-run`` (onnxruntime) and reports: bundle
size, the runtime venv's size (``--venv DIR``: a venv holding only
``pip install ./runtime``), clad-run's start-up time (the bundle opened,
checked and its models loaded, from the command's own report), images/s of
each (whole commands, process start included), and the largest raw-score difference between the two results.csv and
the parity the export measured on its golden set.

Usage: python benchmarks/deploy.py WORK RUN IMAGES... [--venv DIR] [--tag TAG]   (writes bench-results/deploy-TAG.json)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import report  # noqa: E402


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return time.perf_counter() - t0, res.stderr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("run")
    ap.add_argument("images", nargs="+")
    ap.add_argument("--venv", default="", help="a venv with only clad-run installed (its size is reported)")
    ap.add_argument("--tag", default="", help="names the JSON (bench-results/deploy-TAG.json; default: RUN)")
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "runtime")])}
    tmp = Path(tempfile.mkdtemp(prefix="deploy-bench-"))
    bundle = tmp / "bundle"
    t_export, _ = timed([sys.executable, "-m", "pipeline.cli", "export", a.work, "--run", a.run, "--out",
                         str(bundle)], env)
    t_torch, _ = timed([sys.executable, "-m", "pipeline.cli", "score", a.work, "--run", a.run, *a.images,
                        "--out", str(tmp / "torch"), "--device", "cpu"], env)
    runner = [str(Path(a.venv) / "bin" / "clad-run")] if a.venv else [sys.executable, "-m", "clad_run"]
    t_onnx, err = timed([*runner, str(bundle), *a.images, "--out", str(tmp / "onnx")], env)
    start = float(re.search(r"loaded in ([0-9.]+) s", err).group(1))
    t_verify, _ = timed([*runner, str(bundle), "--verify"], env)
    with open(tmp / "torch" / "results.csv") as f1, open(tmp / "onnx" / "results.csv") as f2:
        pairs = list(zip(csv.DictReader(f1), csv.DictReader(f2), strict=True))
    n = len(pairs)
    diff = max(abs(float(x["score"]) - float(y["score"])) for x, y in pairs)
    rel = max(abs(float(x["score"]) - float(y["score"])) / max(abs(float(x["score"])), 1e-9) for x, y in pairs)
    # CLAD's scores cross zero (a discriminator's logit): a difference per score explodes there, so it is
    # also given against the range of the scores (the scale on which thresholds sit)
    span = max(float(x["score"]) for x, _ in pairs) - min(float(x["score"]) for x, _ in pairs)
    range_rel = diff / max(span, 1e-9)
    verdicts = sum(x["verdict"] == y["verdict"] for x, y in pairs)
    m = json.loads((bundle / "manifest.json").read_text())
    rows = [{"path": "clad score (torch)", "images": n, "seconds": round(t_torch, 2), "img_per_s": round(n / t_torch, 2)},
            {"path": "clad-run (onnxruntime)", "images": n, "seconds": round(t_onnx, 2),
             "img_per_s": round(n / t_onnx, 2)}]
    report(f"deploy-{a.tag or a.run}", rows, head=m["head_name"], bundle_mib=size_of(bundle) / 2**20,
           venv_mib=size_of(Path(a.venv)) / 2**20 if a.venv else None, export_s=t_export,
           runtime_start_s=start, verify_s=t_verify, max_score_diff=diff, max_score_rel_diff=rel,
           max_score_diff_of_range=range_rel,
           verdicts_agree=f"{verdicts}/{n}", parity_at_export=m["parity"])
    print(f"bundle {size_of(bundle) / 2**20:.1f} MiB; clad-run start-up {start:.2f} s; max score difference "
          f"{diff:.3g} (relative {rel:.3g}; {range_rel:.3g} of the score range); verdicts agree {verdicts}/{n}")


if __name__ == "__main__":
    main()
