"""Distributed training (core.distributed; torchrun): the collectives, batch norm over the
global batch, one CLAD step and whole runs on 2 CPU processes (gloo) against one process.

Tolerances are measured, not guessed: the differences between 2 processes and 1 are sums
taken in another order (float32), the same size as those between 1 process on 1 thread
and 1 process on 2 threads.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from core import distributed
from stages.train.losses import contrastive_loss

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    distributed.init_from_env(torch.device("cpu"))


def _spawn(fn, *args) -> None:  # noqa: ANN001
    mp.spawn(fn, args=(2, _free_port(), *args), nprocs=2, join=True)


# -- (a) the collectives and batch norm on hand-built tensors -----------------------------
def _collectives_worker(rank: int, world: int, port: int) -> None:
    _join(rank, world, port)
    try:
        assert distributed.active() and distributed.world_size() == 2 and distributed.rank() == rank
        g = torch.Generator().manual_seed(0)
        close = dict(rtol=1e-5, atol=1e-6)

        # all_reduce_sum: rank r contributes x_r and weighs the sum by w_r
        xs = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(world)]
        ws = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(world)]
        x = xs[rank].clone().requires_grad_(True)
        y = distributed.all_reduce_sum(x)
        (y * ws[rank]).sum().backward()
        torch.testing.assert_close(y.detach(), sum(xs))
        torch.testing.assert_close(x.grad, sum(ws))  # d/dx_r of sum_q (sum_p x_p) . w_q

        # all_gather_rows, unequal shares (7 rows: 4 + 3); rank r's loss is its own function of all rows
        full = torch.randn(7, 5, generator=g, dtype=torch.float64)
        weights = [torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(world)]
        first, last = distributed.share(7)
        assert (first, last) == ((0, 4), (4, 7))[rank]
        mine = full[first:last].clone().requires_grad_(True)
        gathered = distributed.all_gather_rows(mine)
        torch.testing.assert_close(gathered.detach(), full)
        (gathered**2 * weights[rank]).sum().backward()
        ref = full.clone().requires_grad_(True)
        sum((ref**2 * w).sum() for w in weights).backward()
        torch.testing.assert_close(mine.grad, ref.grad[first:last])
        labels = torch.arange(7)[first:last]
        assert torch.equal(distributed.all_gather_rows(labels), torch.arange(7))  # integers, no graph

        # batch norm: the global batch's statistics, gradients and running statistics
        from stages.heads.clad_model import BatchNorm1d

        for momentum in (0.1, None):
            data = torch.randn(9, 6, generator=g) * 3 + 1
            upstream = torch.randn(9, 6, generator=g)
            ref_bn, bn = nn.BatchNorm1d(6, momentum=momentum), BatchNorm1d(6, momentum=momentum)
            with torch.no_grad():
                ref_bn.weight.copy_(torch.randn(6, generator=g))
                ref_bn.bias.copy_(torch.randn(6, generator=g))
            bn.load_state_dict(ref_bn.state_dict())
            for _ in range(2):  # twice: the running statistics' update, momentum None a cumulative average
                xr = data.clone().requires_grad_(True)
                ref_bn.zero_grad()
                ref_out = ref_bn(xr)
                (ref_out * upstream).sum().backward()
                first, last = distributed.share(9)
                xm = data[first:last].clone().requires_grad_(True)
                bn.zero_grad()
                out = bn(xm)
                (out * upstream[first:last]).sum().backward()
                torch.testing.assert_close(out.detach(), ref_out.detach()[first:last], **close)
                torch.testing.assert_close(xm.grad, xr.grad[first:last], **close)
                for p_ref, p in zip(ref_bn.parameters(), bn.parameters(), strict=True):  # summed over ranks
                    torch.testing.assert_close(distributed.all_reduce_sum(p.grad), p_ref.grad, **close)
            torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, **close)
            torch.testing.assert_close(bn.running_var, ref_bn.running_var, **close)
            assert int(bn.num_batches_tracked) == 2
            bn.eval()  # eval mode: plain batch norm on the running statistics, no collective
            torch.testing.assert_close(bn(data[:2]), ref_bn.eval()(data[:2]), **close)

        assert distributed.on_main(lambda: distributed.rank() * 10 + 7) == 7  # rank 0's value everywhere
        assert distributed.broadcast_object({"a": rank}) == {"a": 0}
    finally:
        distributed.close()


@pytest.mark.slow  # two spawned processes (about 5 s)
def test_collectives_and_batch_norm_on_two_processes_equal_one():
    _spawn(_collectives_worker)


def test_share_partitions_rows_contiguously():
    for n in (0, 1, 7, 8, 1001):
        for w in (1, 2, 3, 8):
            parts = [distributed.share(n, r, w) for r in range(w)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


def test_one_process_needs_no_process_group():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    x = torch.randn(3, 2)
    assert distributed.all_reduce_sum(x) is x and distributed.all_gather_rows(x) is x
    assert distributed.on_main(lambda: 5) == 5 and distributed.share(10) == (0, 10)


def test_contrastive_rows_partition_the_loss():
    """contrastive_loss(rows=...) over a partition of the query rows sums to the whole
    loss, value and gradient (each process's part in a distributed run)."""
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(23, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=g)
    mask = torch.rand(23, generator=g) > 0.3
    for pair_mask in (None, mask):
        z = z0.clone().requires_grad_(True)
        whole = contrastive_loss(z, y, pair_mask=pair_mask, block=5)
        whole.backward()
        parts, grads = [], []
        for first, last in ((0, 9), (9, 10), (10, 23)):
            zp = z0.clone().requires_grad_(True)
            v = contrastive_loss(zp, y, pair_mask=pair_mask, block=5, rows=(first, last))
            v.backward()
            parts.append(v.detach())
            grads.append(zp.grad)
        torch.testing.assert_close(sum(parts), whole.detach())
        torch.testing.assert_close(sum(grads), z.grad)


# -- (b) one CLAD step on the tiny workspace: 2 processes against 1 -------------------------
STEP_VARIANTS = {
    # odd parts (603 normal, 301 local, 301 global rows): the shares are unequal
    "default": ["batch_contrastive=1206", "gas_steps=2", "gas_project_every=1"],
    "coupled": ["batch_contrastive=1206", "gas_steps=2", "gas_project_every=1", "gas_bn=train",
                "gas_direction=rows", "contrast_normals_only=true", "fusion_beta=stored"],
}


def _one_step(work: str, sets: list[str], run_dir: str) -> dict[str, torch.Tensor]:
    """Gradients, losses and batch-norm statistics after one contrastive step of CLAD."""
    from cache.store import FeatureStore
    from cache.stream import TrainCache
    from core.files import seed_from
    from core.layout import RunFiles
    from pipeline.runs import run_config
    from pipeline.workspace import Workspace
    from stages.heads.clad_train import CladTrainer
    from stages.train.epochs import backward
    from stages.train.stage import train_context

    ws = Workspace(Path(work))
    cfg = run_config(ws.config(), {"profile": "fast", "head": "clad", "sets": sets})
    store = FeatureStore(ws.cache_dir / "train.zarr")
    ctx = train_context(cfg, TrainCache(store), RunFiles(Path(run_dir)), torch.device("cpu"), store.info().key,
                        lambda _m: None, lambda *_a: None)
    tr = CladTrainer(cfg.train.head_settings(), ctx)
    ph = tr.phases()[0]
    for batch in tr.batches(ph, 0):
        break
    torch.manual_seed(seed_from(ctx.seed, 0, 0))
    tr.model.train()
    losses = tr.step(batch, ph, 0, 0)
    backward(losses)
    values = distributed.all_reduce_sum(torch.stack([v.detach().double() for v in losses.values()]))
    out = {f"grad.{k}": p.grad.clone() for k, p in tr.model.named_parameters()}
    out.update({f"buffer.{k}": b.clone() for k, b in tr.model.named_buffers()})
    out.update({f"loss.{k}": v for k, v in zip(losses, values, strict=True)})
    return out


def _step_worker(rank: int, world: int, port: int, work: str, out: str) -> None:
    _join(rank, world, port)
    try:
        results = {name: _one_step(work, sets, str(Path(out).parent / f"run-{name}"))
                   for name, sets in STEP_VARIANTS.items()}
        if rank == 0:
            torch.save(results, out)
    finally:
        distributed.close()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def test_one_clad_step_on_two_processes_equals_one(extracted, tmp_path):
    """Losses, every parameter's gradient and the batch-norm statistics of one contrastive
    step: 2 gloo processes (each its share of the same global batch, DDP) against 1.
    Measured (relative norm of the difference): losses <= 1e-7, gradients <= 1.2e-4 (one
    process on 1 thread against 2 threads: 6.8e-4, the same rounding), statistics <= 1e-6."""
    torch.set_num_threads(1)
    out = tmp_path / "two.pt"
    _spawn(_step_worker, str(extracted), str(out))
    two = torch.load(out, weights_only=True)
    worst: dict[str, float] = {}
    for name, sets in STEP_VARIANTS.items():
        one = _one_step(str(extracted), sets, str(tmp_path / f"one-{name}"))
        assert one.keys() == two[name].keys()
        scale = max(float(v.norm()) for k, v in one.items() if k.startswith("grad."))
        for k, v in one.items():
            if k.endswith("num_batches_tracked"):
                assert torch.equal(v, two[name][k])
                continue
            # the biases of a Linear followed by batch norm (or by a shift-invariant loss) have a true
            # gradient of 0: theirs is rounding noise, compared by its size, not its direction
            if k.startswith("grad.") and float(v.norm()) < 1e-5 * scale:
                assert float(two[name][k].norm()) < 1e-5 * scale, k
                continue
            kind = k.split(".")[0]
            worst[kind] = max(worst.get(kind, 0.0), _relative(v, two[name][k]))
    print("2 vs 1 process, worst relative difference:", worst)
    assert worst["loss"] < 1e-6 and worst["grad"] < 5e-4 and worst["buffer"] < 1e-5, worst


# -- (b) whole runs: torchrun --nproc_per_node=2 against one process ------------------------
E2E = ["--head", "clad", "--set", "epochs_contrastive=1", "--set", "epochs_finetune=1",
       "--set", "batch_contrastive=3200", "--set", "batch_finetune=100000", "--set", "gas_steps=1",
       "--set", "gas_project_every=1"]  # contrastive: 4 steps an epoch (the last smaller); fine-tuning: one


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _torchrun(*args: str, n: int = 2) -> list[str]:
    return [*TORCHRUN, "--standalone", f"--nproc_per_node={n}", "-m", "pipeline.cli", "--", *args]


def _final(work: Path, run: str) -> dict[str, torch.Tensor]:
    return torch.load(work / "runs" / run / "checkpoints" / "final.pt", weights_only=True)["model"]


def test_torchrun_two_processes_train_like_one(extracted):
    """Per-epoch losses and final weights of CLAD trained by torchrun on 2 processes and by
    one process with the same global batches (several contrastive steps: each rank takes its
    share of every global batch). Measured on the built-in tiny set: losses 5e-6 relative
    (tolerance 1e-4). Weights: Adam's first steps are about lr x sign(gradient), so a weight
    whose gradient is at rounding level moves +-lr either way: 0.20% of the parameters differ
    by more than lr/2 (tolerance 1%; with one step an epoch 0.13-0.15%, and one process on 1
    thread against 2 threads 0.14%); batch-norm statistics, re-estimated after each epoch,
    3.5e-3 (1e-2). With one contrastive step of all 12,544 rows the test took 74 s on 2 cores, with these 41 s."""
    work = extracted
    one = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(work), "--run", "ddp-one", *E2E],
                         capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(_torchrun("train", str(work), "--run", "ddp-two", *E2E), capture_output=True, text=True,
                         env=_env(), cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stderr
    assert two.stderr.count("train: done") == 1 and two.stderr.count("phase contrastive") == 1  # rank 1 silent
    h1 = json.loads((work / "runs" / "ddp-one" / "train.json").read_text())["history"]
    h2 = json.loads((work / "runs" / "ddp-two" / "train.json").read_text())["history"]
    assert [(r["phase"], r["epoch"]) for r in h1] == [(r["phase"], r["epoch"]) for r in h2]
    rel = max(abs(a[k] - b[k]) / abs(a[k]) for a, b in zip(h1, h2, strict=True)
              for k in ("cls", "hinge", "contrast", "var") if k in a)
    a, b = _final(work, "ddp-one"), _final(work, "ddp-two")
    lr = 2e-4
    params = [k for k in a if a[k].is_floating_point() and "running" not in k]
    moved = sum(int(((a[k] - b[k]).abs() > lr / 2).sum()) for k in params) / sum(a[k].numel() for k in params)
    stats = max(_relative(a[k], b[k]) for k in a if "running" in k)
    print(f"2 vs 1 process: losses {rel:.1e} relative; {moved:.2%} of the weights differ by > lr/2; "
          f"batch-norm statistics {stats:.1e}")
    assert rel < 1e-4, rel
    assert moved < 0.01, moved
    assert stats < 1e-2, stats


def test_torchrun_refuses_a_head_that_cannot_train_distributed(extracted):
    res = subprocess.run(_torchrun("train", str(extracted), "--run", "ddp-knn", "--head", "knn"), capture_output=True,
                         text=True, env=_env(), cwd=ROOT)
    assert res.returncode != 0
    assert "head knn cannot train on several processes" in res.stderr
    assert res.stderr.count("cannot train on several processes") == 1  # one line, from rank 0 alone
    assert not (extracted / "runs" / "ddp-knn" / "checkpoints").exists()


# -- (c) kill -9 of one rank, then the same command resumes and finishes --------------------
def _workers(parent: int) -> dict[int, int]:
    """{rank: pid} of the processes torchrun started (children of ``parent``, by their RANK)."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == parent:
            for e in env:
                if e.startswith(b"RANK="):
                    out[int(e[5:])] = int(p.name)
    return out


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers in /proc")
def test_kill9_of_one_rank_resumes_from_rank0_checkpoint(extracted):
    """SIGKILL of rank 1 mid-training: torchrun ends rank 0 too; the same command resumes from
    rank 0's last checkpoint, finishes, and ends with the weights of an uninterrupted run (gloo
    on the CPU sums in a fixed order)."""
    work, run = extracted, "ddp-killed"
    args = ["train", str(work), "--run", run, "--head", "clad", "--set", "epochs_contrastive=2",
            "--set", "epochs_finetune=1", "--set", "batch_contrastive=1200", "--set", "batch_finetune=3000",
            "--set", "gas_steps=1", "--set", "gas_project_every=1"]
    proc = subprocess.Popen(_torchrun(*args), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = work / "runs" / run / "checkpoints" / "latest.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not latest.exists():
        time.sleep(0.05)
    time.sleep(1.0)
    assert proc.poll() is None, "training finished before it could be killed"
    ranks = _workers(proc.pid)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0  # torchrun ends the other rank and fails
    assert not (work / "runs" / run / "train.json").exists()
    res = subprocess.run(_torchrun(*args), capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "train: resuming at contrastive epoch 1" in res.stderr  # the resume crosses into fine-tuning
    hist = json.loads((work / "runs" / run / "train.json").read_text())["history"]
    assert [(r["phase"], r["epoch"]) for r in hist] == [("contrastive", e) for e in range(2)] + \
        [("finetune", e) for e in range(1)]
    whole = [a if a != run else "whole" for a in args]  # the same training, never interrupted
    res = subprocess.run(_torchrun(*whole), capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _final(work, run), _final(work, "whole")
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed distributed run ends with other weights"
