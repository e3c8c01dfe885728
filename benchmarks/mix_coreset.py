"""What a greedy coreset of the score mix's banks would cost CLAD and buy it.

For one trained CLAD run whose score mix uses d (``train.clad.score_mix``), scores
the test set with each mixed class's bank whole, then reduced to ``FRACTION`` of
its rows by the greedy coreset the head itself uses with ``score_mix_coreset`` < 1
(``stages.heads.clad_bank.reduce_bank``, in the class's own d space, seeded).
Give it a run trained with ``score_mix_coreset = 1.0``: a run whose banks are cut
already is refused (its 'whole' bank would be the coreset). Same network, same choices, same coefficients:
the rows differ only by the bank searched. Prints per class image AUROC, pixel
AUROC, AUPRO and milliseconds per image of ``score_maps``, plus the coreset's
selection time; test labels only measure (nothing is chosen here).

Usage: python benchmarks/mix_coreset.py WORK RUN [FRACTION]   (default 0.1)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.adaptor_knn import head_metrics, test_items  # noqa: E402
from benchmarks.common import progress_row, report  # noqa: E402
from core.layout import RunFiles  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from stages.heads import load_trained_head  # noqa: E402
from stages.heads.clad_bank import reduce_bank  # noqa: E402


def main(work: Path, run: str, fraction: float) -> None:
    files = RunFiles(work / "runs" / run)
    cfg = load_config(files.root / "config.toml")
    head, _ = load_trained_head(files.final, torch.device("cpu"))
    if head.mix is None or not head.mix.mixed:
        sys.exit(f"mix_coreset: run {run!r} scores every class by s alone; no bank to reduce")
    if head.mix.kept:
        sys.exit(f"mix_coreset: run {run!r} cut its banks already (score_mix_coreset < 1); train one with "
                 "--set score_mix_coreset=1.0 to compare")
    names = head.meta["class_names"]
    whole = dict(head.banks)  # read from the cache once
    reduced, picked_s = {}, {}
    for k, bank in whole.items():
        t0 = time.perf_counter()
        reduced[k] = reduce_bank(bank, fraction, cfg.train.seed, torch.device("cpu"),
                                 lambda m, name=names[k]: print(f"mix_coreset: {name}: {m}", flush=True))[0]
        picked_s[k] = time.perf_counter() - t0
    tests = list(test_items(work))
    rows_out = []
    for label, banks in (("whole bank", whole), (f"coreset {fraction:g}", reduced)):
        head._banks = banks
        for name, feats, masks, labels in tests:
            m, per_image = head_metrics(head, cfg, feats, masks, labels)
            k = names.index(name)
            rows_out.append({"bank": label, "class": name, "rows": len(banks[k].rows) if k in banks else 0,
                             "image_auroc": round(100 * m["image_auroc"], 2),
                             "pixel_auroc": round(100 * m["pixel_auroc"], 2), "aupro": round(100 * m["aupro"], 2),
                             "ms_per_image": round(1000 * per_image, 1),
                             "select_s": round(picked_s.get(k, 0.0), 1) if label != "whole bank" else 0.0})
            progress_row(rows_out[-1])
    for label in dict.fromkeys(r["bank"] for r in rows_out):
        own = [r for r in rows_out if r["bank"] == label]
        rows_out.append({"bank": label, "class": "mean", "rows": sum(r["rows"] for r in own),
                         **{c: round(float(np.mean([r[c] for r in own])), 2)
                            for c in ("image_auroc", "pixel_auroc", "aupro", "ms_per_image")},
                         "select_s": round(sum(r["select_s"] for r in own), 1)})
    report(f"mix_coreset_{work.name}_{run}", rows_out, work=str(work), run=run, fraction=fraction,
           on="test set", note="same network and mix; only the banks differ; test labels only measure")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]) if len(sys.argv) == 4 else 0.1)
