"""clad export and the deploy runtime clad-run (issue 21): round trip for every head, tampering, overrides."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages.heads import head_names
from tests.conftest import ROOT, clad

# each head trained in seconds on the tiny data (as tests/test_heads.py does)
TINY = {"clad": ["epochs_contrastive=1", "epochs_finetune=1", "batch_contrastive=1200", "batch_finetune=2000",
                 "gas_steps=1", "gas_project_every=1"],
        "rlr": ["epochs=1", "dim=32", "layers=1", "attn_heads=2"]}
COMPARED = ["path", "class", "class_from", "confidence", "predicted_class", "in_distribution", "folder_class",
            "threshold", "threshold_from", "verdict"]


def clad_run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The runtime as a user runs it (``python -m clad_run``), with only runtime/ added to the path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "runtime"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "clad_run", *args], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    if check and res.returncode != 0:
        raise AssertionError(f"clad-run {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def bundles(extracted, tmp_path_factory) -> dict[str, Path]:
    """Every registered head trained tiny on the extracted workspace and exported."""
    out = {}
    root = tmp_path_factory.mktemp("bundles")
    for name in BUNDLED:
        head = name.split("+")[0]
        run = f"exp_{name.replace('+', '_')}"
        sets = [a for s in TINY.get(head, []) + VARIANTS.get(name, []) for a in ("--set", s)]
        clad("train", str(extracted), "--run", run, "--head", head, *sets)
        clad("export", str(extracted), "--run", run, "--out", str(root / name))
        out[name] = root / name
    return out


# every head, and variants that export another graph: CLAD with a score per class scores whole maps;
# CLAD with a score mix (clad_mix) adds adaptor-space banks
VARIANTS = {"clad+class": ["score_heads=class"], "clad+mix": ["score_mix=distance"],
            "clad+mix+space": ["score_mix=distance", "score_mix_space=contrastive"]}  # d after phase 1's adaptor
BUNDLED = [*head_names(), *VARIANTS]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundle_scores_like_clad_score_for_every_head(name, bundles, extracted, tiny_data, tmp_path):
    bundle = bundles[name]
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["head_name"] == name.split("+")[0] and m["classes"] == ["washer", "weave"]
    assert m["parity"]["ok"] and m["parity"]["verdicts_differ"] == 0, m["parity"]
    assert m["features"]["opset"] and m["features"]["exporter"] and m["versions"]["onnxruntime"]
    assert set(m["files"]) == {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.name != "manifest.json"
                               and p.is_file()}
    if m["head"]["rule"] in ("knn_bank", "routed_knn"):  # data heads: per-class arrays, no graph
        assert not list((bundle / "head").glob("*.onnx"))
        assert any("weave" in p.name for p in (bundle / "head").glob("*.npy"))
    else:
        assert list((bundle / "head").glob("*.onnx"))
    images = [str(tiny_data / c / "test") for c in ("washer", "weave")]
    run = f"exp_{name.replace('+', '_')}"
    clad("score", str(extracted), "--run", run, *images, "--out", str(tmp_path / "torch"))
    res = clad_run(str(bundle), *images, "--out", str(tmp_path / "onnx"), "--verify")
    assert "verify:" in res.stderr and "OK" in res.stderr
    a, b = rows(tmp_path / "torch" / "results.csv"), rows(tmp_path / "onnx" / "results.csv")
    assert list(a[0]) == list(b[0]) and len(a) == len(b) == 10
    for x, y in zip(a, b, strict=True):
        assert {k: x[k] for k in COMPARED} == {k: y[k] for k in COMPARED}
        assert float(y["score"]) == pytest.approx(float(x["score"]), rel=1e-4)
        assert float(y["normalized"]) == pytest.approx(float(x["normalized"]), abs=2e-4)
        assert Path(y["heatmap"]).is_file()


def test_changed_or_missing_bundle_file_is_refused_in_one_line(bundles, tiny_data, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(bundles["routed_knn"], bundle)
    victim = sorted((bundle / "head").glob("rows_*.npy"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    res = clad_run(str(bundle), str(tiny_data / "weave" / "test"), "--out", str(tmp_path / "o"), check=False)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert str(victim) in res.stderr and "changed since export" in res.stderr
    (bundle / "feature_extractor.onnx").unlink()
    res = clad_run(str(bundle), "--verify", check=False)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "feature_extractor.onnx" in res.stderr and "missing" in res.stderr


def test_threshold_override_changes_verdicts_as_stated(bundles, tiny_data, tmp_path):
    bundle, images = bundles["knn"], str(tiny_data / "weave" / "test")
    clad_run(str(bundle), images, "--out", str(tmp_path / "a"))
    base = rows(tmp_path / "a" / "results.csv")
    assert {r["threshold_from"] for r in base} == {"calibrated"}
    low = min(float(r["score"]) for r in base) - 1
    clad_run(str(bundle), images, "--out", str(tmp_path / "b"), "--threshold", f"weave={low}")
    for r in rows(tmp_path / "b" / "results.csv"):
        assert r["verdict"] == "anomalous" and r["threshold_from"] == "user (--threshold)"
        assert float(r["threshold"]) == pytest.approx(low) and float(r["normalized"]) > 0.5
    high = max(float(r["score"]) for r in base) + 1
    clad_run(str(bundle), images, "--out", str(tmp_path / "c"), "--threshold", f"weave={high}", "--class", "weave")
    assert {r["verdict"] for r in rows(tmp_path / "c" / "results.csv")} == {"normal"}
    for bad in ("nosuch=1", "weave=abc", "weave"):
        res = clad_run(str(bundle), images, "--out", str(tmp_path / "d"), "--threshold", bad, check=False)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "--threshold" in res.stderr


def test_runtime_imports_neither_torch_nor_the_project():
    src = "\n".join(p.read_text() for p in (ROOT / "runtime" / "clad_run").glob("*.py"))
    assert not re.search(r"^\s*(import|from)\s+(torch|scipy|timm|stages|pipeline|cache|core)\b", src, re.M)
    code = ("import sys, clad_run.cli, clad_run.scoring, clad_run.verify, clad_run.maps; "
            "bad = [m for m in ('torch', 'scipy', 'stages', 'pipeline') if m in sys.modules]; "
            "assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "runtime")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT / "runtime")


def test_runtime_maps_match_stages_maps():
    import numpy as np
    import torch

    from clad_run.maps import anomaly_maps as runtime_maps
    from stages.maps import anomaly_maps

    rng = np.random.default_rng(0)
    for side, size, sigma in ((28, 224, 4.0), (32, 256, 2.5), (7, 50, 0.0)):
        s = rng.gamma(2, 1, (2, side * side)).astype(np.float32)
        a, b = anomaly_maps(torch.from_numpy(s), size, sigma), runtime_maps(s, size, sigma)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


@pytest.mark.slow
def test_runtime_installs_into_a_fresh_venv_without_torch_and_scores(bundles, tiny_data, tmp_path):
    """pip install ./runtime into a new venv (numpy, onnxruntime, pillow come from the package index)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(ROOT / "runtime")],
                         capture_output=True, text=True)
    if pip.returncode != 0 and "Could not find a version" in pip.stderr + pip.stdout:
        pytest.skip("no package index reachable for numpy/onnxruntime/pillow")
    assert pip.returncode == 0, pip.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    has_torch = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, env=env)
    assert has_torch.returncode != 0  # the runtime venv has no torch
    res = subprocess.run([str(venv / "bin" / "clad-run"), str(bundles["routed_knn"]), str(tiny_data / "weave" / "test"),
                          "--out", str(tmp_path / "o"), "--verify"], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(rows(tmp_path / "o" / "results.csv")) == 5 and "OK" in res.stderr


def test_export_refuses_bad_input_in_one_line(extracted, tmp_path):
    res = clad("export", str(extracted), "--run", "never_trained", "--out", str(tmp_path / "b"), check=False)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "never_trained" in res.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    res = clad("export", str(extracted), "--run", "never_trained", "--out", str(busy), check=False)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "no manifest.json" in res.stderr
    assert (busy / "notes.txt").read_text() == "mine"


def test_clad_run_out_is_one_whole_scoring_even_after_kill_9(bundles, tiny_data, tmp_path):
    """clad-run builds --out in a hidden sibling and swaps it in: killed mid-way,
    the folder still holds the previous scoring whole; the next run finishes."""
    import signal
    import time

    images = sorted(p for p in Path(tiny_data).rglob("test/*/*.png"))
    few, many = tmp_path / "few", tmp_path / "many"
    for folder, n in ((few, 3), (many, 60)):
        folder.mkdir()
        for i in range(n):
            shutil.copy(images[i % len(images)], folder / f"{i:03d}.png")
    out = tmp_path / "res" / "out"
    clad_run(str(bundles["knn"]), str(few), "--out", str(out))
    assert len(rows(out / "results.csv")) == 3
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "runtime"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "clad_run", str(bundles["knn"]), str(many), "--out", str(out),
                             "--batch", "2"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list((tmp_path / "res").rglob(".out.tmp-*/00006_*")):
        time.sleep(0.02)
    assert proc.poll() is None, "scoring finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    table = rows(out / "results.csv")
    assert len(table) == 3
    assert sorted(p.name for p in out.glob("*.png")) == sorted(Path(r["heatmap"]).name for r in table)
    clad_run(str(bundles["knn"]), str(many), "--out", str(out))
    table = rows(out / "results.csv")
    assert len(table) == 60 and all(Path(r["heatmap"]).is_file() for r in table)
    assert not [p for p in (tmp_path / "res").iterdir() if p.name.startswith(".")]  # the dead temporary removed
