"""Benchmark: cost against the number of classes in one model (issue 22).

For each N: ``clad demo-data --n-classes N`` (the same images per class at every N),
``clad init``, ``clad extract``, then per head ``clad train --profile fast`` and
``clad score`` of every test image. Each stage is a whole command run under
``/usr/bin/time -v``: wall time and peak resident memory of that process (process start
included: ~3 s of interpreter and torch start-up). Also: cache size, scoring time per
image, routing accuracy (the class a scored image is routed to against the class folder
it came from).

Usage: python benchmarks/scale.py [--n 1,5,15,50] [--heads routed_knn,knn,clad]
       [--clad-max-n 15] [--train 8] [--test-good 2] [--test-defect 1] [--root DIR]
Writes bench-results/scale.json and bench-results/scale.png.
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import OUT_DIR, progress_row, report  # noqa: E402

CLI = [sys.executable, "-m", "pipeline.cli"]


def measured(args: list[str]) -> tuple[float, float]:
    """Run ``clad ARGS`` under /usr/bin/time -v: (wall seconds, peak RSS in MiB)."""
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *CLI, *args], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"clad {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    return wall, rss_kib / 1024


def size_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def routing(results_csv: Path) -> tuple[int, float]:
    """(images, share routed to the class folder they came from: DATA/CLASS/test/KIND/IMAGE)."""
    with open(results_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    right = sum(r["predicted_class"] == Path(r["path"]).parts[-4] for r in rows)
    return len(rows), right / len(rows)


def one_n(n: int, heads: list[str], clad_max_n: int, counts: list[str], root: Path) -> list[dict]:
    data, work = root / f"data-{n}", root / f"work-{n}"
    for p in (data, work):
        shutil.rmtree(p, ignore_errors=True)
    t_data, _ = measured(["demo-data", str(data), "--n-classes", str(n), *counts])
    measured(["init", str(work), "--data", str(data)])
    t_ext, rss_ext = measured(["extract", str(work)])
    cache = size_mib(work / "cache")
    rows = [{"N": n, "stage": "extract", "head": "-", "wall_s": round(t_ext, 1), "peak_rss_mib": round(rss_ext),
             "cache_mib": round(cache, 1), "score_s_per_img": None, "routing_pct": None,
             "note": f"demo-data {t_data:.1f} s"}]
    progress_row(rows[-1])
    tests = sorted(str(p) for p in data.glob("*/test"))
    for head in heads:
        if head == "clad" and n > clad_max_n:
            continue
        t_tr, rss_tr = measured(["train", str(work), "--run", head, "--head", head, "--profile", "fast"])
        rows.append({"N": n, "stage": "train", "head": head, "wall_s": round(t_tr, 1), "peak_rss_mib": round(rss_tr),
                     "cache_mib": round(cache, 1), "score_s_per_img": None, "routing_pct": None,
                     "note": f"run {size_mib(work / 'runs' / head):.1f} MiB"})
        progress_row(rows[-1])
        out = work / "scores" / head
        t_sc, rss_sc = measured(["score", str(work), "--run", head, *tests, "--out", str(out), "--device", "cpu"])
        n_img, routed = routing(out / "results.csv")
        rows.append({"N": n, "stage": "score", "head": head, "wall_s": round(t_sc, 1), "peak_rss_mib": round(rss_sc),
                     "cache_mib": round(cache, 1), "score_s_per_img": round(t_sc / n_img, 3),
                     "routing_pct": round(100 * routed, 1), "note": f"{n_img} images"})
        progress_row(rows[-1])
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax, label in (("wall_s", axes[0], "wall time (s)"), ("peak_rss_mib", axes[1], "peak resident (MiB)")):
        for series in sorted({(r["stage"], r["head"]) for r in rows}):
            pts = [(r["N"], r[key]) for r in rows if (r["stage"], r["head"]) == series]
            ax.plot(*zip(*pts), marker="o", label=f"{series[0]} {series[1]}".replace(" -", ""))
        ax.set_xscale("log")
        ax.set_xlabel("classes in one model (N)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("clad: cost against the number of classes (whole commands, 2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="1,5,15,50", help="numbers of classes, comma-separated")
    ap.add_argument("--heads", default="routed_knn,knn,clad")
    ap.add_argument("--clad-max-n", type=int, default=15, help="CLAD (fast) only up to this N")
    ap.add_argument("--train", default="8", help="training images per class")
    ap.add_argument("--test-good", default="2")
    ap.add_argument("--test-defect", default="1", help="test images per defect kind (3 kinds a class)")
    ap.add_argument("--root", default="", help="where data and workspaces go (default: a temporary folder)")
    a = ap.parse_args()
    root = Path(a.root) if a.root else Path(tempfile.mkdtemp(prefix="scale-bench-"))
    counts = ["--train", a.train, "--test-good", a.test_good, "--test-defect", a.test_defect]
    heads = [h for h in a.heads.split(",") if h]
    rows: list[dict] = []
    for n in (int(x) for x in a.n.split(",")):
        rows += one_n(n, heads, a.clad_max_n, counts, root)
        report("scale", rows, images_per_class={"train": a.train, "test_good": a.test_good,
                                                "test_defect_per_kind": a.test_defect}, root=str(root))
        plot(rows, OUT_DIR / "scale.png")  # after every N: a killed benchmark keeps what it measured


if __name__ == "__main__":
    main()
