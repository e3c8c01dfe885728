"""Shared fixtures: a tiny generated data set and an extracted workspace.

Tests are marked ``slow`` here (see ``pytest_collection_modifyitems``) so that
``make test-fast`` (``pytest -m "not slow"``) is a loop of unit tests of a minute or
two; ``make test`` (what CI runs) still runs every test.
"""

from __future__ import annotations

import os
import inspect
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_config, save_config, train_from_dict
from stages.extract.demo_data import write_demo_dataset

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CLAD = [sys.executable, "-m", "pipeline.cli"]


# A test is slow when it needs a generated data set, an extracted cache or a trained
# run (session workspaces built by real subprocesses), or when it runs the CLI, a
# subprocess or the real data sets itself.
SLOW_FIXTURES = {"tiny_data", "extracted", "trained"}
SLOW_CALLS = ("clad(", "subprocess", "Popen", "kill_and_resume", "SHARED_DATA", "write_demo_dataset",
              "timm.create_model", "create_backbone(")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: needs a built workspace, a subprocess, a backbone or real data; "
                                       "`make test-fast` leaves it out, `make test` runs it")


def _calls_something_slow(item) -> bool:
    func = getattr(item, "function", None)
    if func is None:
        return False
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        return False
    return any(call in source for call in SLOW_CALLS)


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.get_closest_marker("slow"):
            continue
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or _calls_something_slow(item):
            item.add_marker(pytest.mark.slow)


def clad(*args: str, check: bool = True, process: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run the CLI as a user would: its arguments, its exit code, its stdout and stderr.

    In this process by default (click's runner, the same ``main`` the console script
    calls): a subprocess costs ~3 s of interpreter and torch start-up per command, a third
    of the suite's time on 2 cores. ``process=True`` (or any ``subprocess.run`` keyword)
    runs a real ``python -m pipeline.cli`` subprocess instead: for what only a process
    shows (kill -9, locks between processes, Dask workers, start-up, the real traceback).
    A bug (an exception that is not a clean exit) comes back as exit code 1 with its
    traceback on stderr, as the interpreter would print it."""
    if process or kw:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
        res = subprocess.run(CLAD + list(args), capture_output=True, text=True, env=env, cwd=ROOT, **kw)
    else:
        res = _in_process(list(args))
    if check and res.returncode != 0:
        raise AssertionError(f"clad {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res


def _in_process(args: list[str]) -> subprocess.CompletedProcess:
    import traceback

    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, args, prog_name="clad", catch_exceptions=True)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(CLAD + args, result.exit_code, result.stdout, stderr)


def kill_and_resume(work: Path, run: str, args: list[str], after_s: float) -> str:
    """Train ``run`` in a real subprocess, SIGKILL it ``after_s`` seconds after its
    first checkpoint, then train again to the end (a process too: compare with a reference
    trained by ``clad(..., process=True)``); returns the resumed run's stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(CLAD + ["train", str(work), "--run", run, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = work / "runs" / run / "checkpoints" / "latest.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not latest.exists():
        time.sleep(0.02)
    time.sleep(after_s)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (work / "runs" / run / "train.json").exists()
    return clad("train", str(work), "--run", run, *args, process=True).stderr


def set_config(work: Path, **sections: dict) -> None:
    """Edit WORK/config.toml: set_config(work, features={"shard_images": 2})."""
    from dataclasses import replace

    cfg = load_config(work / "config.toml")
    for name, values in sections.items():
        if name == "train":  # run-level and head settings, spelled as in config.toml's [train]
            cfg = replace(cfg, train=train_from_dict(values, "test", cfg.train)[0])
        else:
            cfg = replace(cfg, **{name: replace(getattr(cfg, name), **values)})
    save_config(cfg, work / "config.toml", train_overrides_only=True)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Two classes (a texture and an object), 5 train, 2 test-good and 3 defects each."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    return write_demo_dataset(out, seed=1, n_train=5, n_test_good=2, n_test_defect=1,
                              classes=("weave", "washer"))


@pytest.fixture(scope="session")
def extracted(tmp_path_factory, tiny_data) -> Path:
    """A workspace on tiny_data, extracted once in-process (shards of 3 images). Its CLAD score
    mix is chosen on 4 probe anomalies a class and 4 versions an image (one held-out image: the fast profile's 32 would
    make every tiny run encode and score 33 probe images a class, the suite ~1.7x slower)."""
    work = tmp_path_factory.mktemp("ws") / "work"
    clad("init", str(work), "--data", str(tiny_data))
    set_config(work, features={"shard_images": 3}, train={"clad": {"score_mix_anomalies": 4, "score_mix_versions": 4}})
    clad("extract", str(work))
    return work


TINY_TRAIN = ["--head", "clad", "--set", "epochs_contrastive=2", "--set", "epochs_finetune=2",
              "--set", "batch_contrastive=1200",
              "--set", "batch_finetune=4000", "--set", "gas_steps=2", "--set", "gas_project_every=2"]


@pytest.fixture(scope="session")
def trained(extracted) -> Path:
    """The extracted workspace with run 't' trained on a tiny schedule."""
    clad("train", str(extracted), "--run", "t", *TINY_TRAIN)
    return extracted
