"""Shared bits of the benchmarks: machine description, JSON output, tables."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

OUT_DIR = Path(os.environ.get("BENCH_OUT", Path(__file__).resolve().parents[1] / "bench-results"))


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2))
    return path


def table(rows: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(c for r in rows for c in r))  # every row's columns, in first-seen order
    width = {c: max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols), "  ".join("-" * width[c] for c in cols)]
    lines += ["  ".join(_fmt(r.get(c, "")).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def progress_row(row: dict[str, Any]) -> None:
    """Print one finished row at once (long diagnostics), without the header."""
    print(table([row]).splitlines()[-1], flush=True)


def report(name: str, rows: list[dict[str, Any]], **extra: Any) -> Path:
    """Print the whole table and write it, with ``extra``, to bench-results/NAME.json."""
    print()
    print(table(rows))
    path = write_result(name, {**extra, "rows": rows})
    print(f"\nwritten: {path}")
    return path


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
