"""Benchmark: cost against the number of classes in one model (issue 22).

For each N: ``clad demo-data --n-classes N`` (the same images per class at every N),
``clad init``, ``clad extract``, then per head ``clad train --profile fast`` and
``clad score`` of every test image. Each stage is a whole command run under
``/usr/bin/time -v``: wall time and peak resident memory of that process (process start
included: ~3 s of interpreter and torch start-up). Also: cache size, scoring time per
image (whole command over images; and the marginal rate beyond the smallest N's command,
``add_marginal``), routing accuracy (the class a scored image is routed to against the class folder
it came from). Extraction's rate is in backbone forwards per second of the stage itself
(``cache/extract.json``: a training image is 1 + ``synthesis.variants`` forwards), beside the
bare backbone forward rate on random input (``benchmarks/extract.py``'s measure, same
threads). ``--dask-at N``: at that N, extraction again into a fresh workspace and routed_knn
scoring again, each on a Dask LocalCluster of 2 workers (``--scheduler local``), with the
scores compared to the in-process ones.

Usage: python benchmarks/scale.py [--n 1,5,15,50] [--heads routed_knn,knn,clad]
       [--clad-max-n 15] [--knn-max-n 100] [--train 8] [--test-good 2] [--test-defect 1] [--root DIR] [--dask-at N] [--tag T]
Writes bench-results/scale.json and bench-results/scale.png (``--tag T``: scale-T.*).
"""

from __future__ import annotations

import argparse
import csv
import json
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


def bare_forward_rate() -> float:
    """Backbone forwards per second on random input (the default configuration, extraction's threads)."""
    from benchmarks.extract import bare_forward
    from pipeline.config import Config
    from stages.extract.stage import EXTRACT_THREADS

    return bare_forward(Config(), 96, EXTRACT_THREADS)


def extract_row(n: int, stage: str, work: Path, data: Path, wall: float, rss: float, bare: float,
                note: str = "") -> dict:
    """One extraction row: the whole command's wall and peak RSS; the stage's own forward rate."""
    ext = json.loads((work / "cache" / "extract.json").read_text())
    n_train = sum(1 for _ in data.glob("*/train/good/*.png"))
    variants = 2  # synthesis.variants default
    forwards = n_train * (1 + variants) + (ext["images"] - n_train)
    rate = forwards / ext["seconds"]
    parts = ", ".join(f"{k} {v:.1f}" for k, v in ext["breakdown_s"].items())
    return {"N": n, "stage": stage, "head": "-", "wall_s": round(wall, 1), "peak_rss_mib": round(rss),
            "cache_mib": round(size_mib(work / "cache"), 1), "score_s_per_img": None, "routing_pct": None,
            "fwd_per_s": round(rate, 1), "vs_bare": round(rate / bare, 2),
            "note": f"{note}stage {ext['seconds']:.0f} s ({parts} s, summed over threads/workers)"}


def scores_of(results_csv: Path) -> dict[str, float]:
    with open(results_csv, newline="") as fh:
        return {r["path"]: float(r["score"]) for r in csv.DictReader(fh) if r["score"]}


def one_n(n: int, heads: list[str], max_n: dict[str, int], counts: list[str], root: Path, bare: float,
          dask: bool) -> list[dict]:
    data, work = root / f"data-{n}", root / f"work-{n}"
    for p in (data, work):
        shutil.rmtree(p, ignore_errors=True)
    t_data, _ = measured(["demo-data", str(data), "--n-classes", str(n), *counts])
    measured(["init", str(work), "--data", str(data)])
    t_ext, rss_ext = measured(["extract", str(work)])
    cache = size_mib(work / "cache")
    rows = [extract_row(n, "extract", work, data, t_ext, rss_ext, bare, f"demo-data {t_data:.1f} s; ")]
    progress_row(rows[-1])
    if dask:
        work2 = root / f"work-{n}-dask"
        shutil.rmtree(work2, ignore_errors=True)
        measured(["init", str(work2), "--data", str(data)])
        t2, rss2 = measured(["extract", str(work2), "--scheduler", "local"])
        rows.append(extract_row(n, "extract dask x2", work2, data, t2, rss2, bare, "LocalCluster 2 workers; "
                                "RSS of the client process only; "))
        progress_row(rows[-1])
        shutil.rmtree(work2, ignore_errors=True)
    tests = sorted(str(p) for p in data.glob("*/test"))
    for head in heads:
        if n > max_n.get(head, n):
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
        if dask and head == "routed_knn":
            out2 = work / "scores" / f"{head}-dask"
            t2, rss2 = measured(["score", str(work), "--run", head, *tests, "--out", str(out2), "--device", "cpu",
                                 "--scheduler", "local"])
            a, b = scores_of(out / "results.csv"), scores_of(out2 / "results.csv")
            diff = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in a)
            rows.append({"N": n, "stage": "score dask x2", "head": head, "wall_s": round(t2, 1),
                         "peak_rss_mib": round(rss2), "cache_mib": round(cache, 1),
                         "score_s_per_img": round(t2 / n_img, 3), "routing_pct": round(100 * routing(
                             out2 / "results.csv")[1], 1),
                         "note": f"LocalCluster 2 workers; client RSS only; max rel. score diff {diff:.1e}"})
            progress_row(rows[-1])
    return rows


def add_marginal(rows: list[dict]) -> list[dict]:
    """Each score row's seconds per image beyond the smallest N's whole command, per head:
    ``(wall(N) - wall(N0)) / (images(N) - images(N0))``. A whole ``clad score`` carries a few
    seconds of interpreter, torch and run loading that divide over few images at small N;
    the marginal rate is what a long folder pays per image."""
    first: dict[tuple[str, str], dict] = {}
    for r in sorted((r for r in rows if r["stage"].startswith("score")), key=lambda r: r["N"]):
        n_img = int(r["note"].split()[0]) if r["note"][:1].isdigit() else round(r["wall_s"] / r["score_s_per_img"])
        base = first.setdefault((r["stage"], r["head"]), {**r, "n_img": n_img})
        if base["N"] != r["N"] and n_img > base["n_img"]:
            r["score_marginal_s_per_img"] = round((r["wall_s"] - base["wall_s"]) / (n_img - base["n_img"]), 3)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax, label in (("wall_s", axes[0], "wall time (s)"), ("peak_rss_mib", axes[1], "peak resident (MiB)")):
        for series in sorted({(r["stage"], r["head"]) for r in rows if "dask" not in r["stage"]}):
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
    ap.add_argument("--knn-max-n", type=int, default=100, help="knn only up to this N (its cost grows with the bank)")
    ap.add_argument("--train", default="8", help="training images per class")
    ap.add_argument("--test-good", default="2")
    ap.add_argument("--test-defect", default="1", help="test images per defect kind (3 kinds a class)")
    ap.add_argument("--root", default="", help="where data and workspaces go (default: a temporary folder)")
    ap.add_argument("--dask-at", type=int, default=0, help="at this N, extraction and routed_knn scoring "
                    "again on a Dask LocalCluster of 2 workers")
    ap.add_argument("--tag", default="", help="names the outputs: bench-results/scale-TAG.{json,png}")
    a = ap.parse_args()
    name = f"scale-{a.tag}" if a.tag else "scale"
    bare = bare_forward_rate()
    print(f"bare backbone forward: {bare:.1f} images/s", file=sys.stderr)
    root = Path(a.root) if a.root else Path(tempfile.mkdtemp(prefix="scale-bench-"))
    counts = ["--train", a.train, "--test-good", a.test_good, "--test-defect", a.test_defect]
    heads = [h for h in a.heads.split(",") if h]
    rows: list[dict] = []
    for n in (int(x) for x in a.n.split(",")):
        rows += one_n(n, heads, {"clad": a.clad_max_n, "knn": a.knn_max_n}, counts, root, bare, n == a.dask_at)
        report(name, add_marginal(rows), images_per_class={"train": a.train, "test_good": a.test_good,
                                                "test_defect_per_kind": a.test_defect}, root=str(root),
               bare_forward_per_s=round(bare, 1))
        plot(rows, OUT_DIR / f"{name}.png")  # after every N: a killed benchmark keeps what it measured


if __name__ == "__main__":
    main()
