#!/usr/bin/env bash
# RLR rows of docs/RESULTS.md's heads table that the first study left out:
# RLR (fast) on bottle and on bottle + built-in as one model, and RLR + CCL
# with k-means pseudo-labels on the built-in set. Final models, no selection.
# Usage: bash benchmarks/rlr_study.sh [STUDY_DIR]   (needs ../shared/data; ~40 min on 2 CPU cores)
source "$(dirname "$0")/study_common.sh"

[ -d "$S/demo-data" ] || $CLAD demo-data "$S/demo-data"
[ -f "$S/demo/config.toml" ] || $CLAD init "$S/demo" --data "$S/demo-data"
$CLAD extract "$S/demo"
train_eval "$S/demo" rlr-ccl-pseudo --head rlr --profile fast --set ccl=pseudo

[ -f "$S/bottle/config.toml" ] || $CLAD init "$S/bottle" --data "$MVTEC/bottle" --textures "$DTD"
$CLAD extract "$S/bottle"
train_eval "$S/bottle" rlr --head rlr --profile fast

mkdir -p "$S/mixed-data"
ln -sfn "$MVTEC/bottle" "$S/mixed-data/bottle"
for c in capsule grain speckle washer weave; do ln -sfn "$(cd "$S/demo-data/$c" && pwd)" "$S/mixed-data/$c"; done
[ -f "$S/mixed/config.toml" ] || $CLAD init "$S/mixed" --data "$S/mixed-data" --textures "$DTD"
$CLAD extract "$S/mixed"
train_eval "$S/mixed" rlr --head rlr --profile fast

.venv/bin/python benchmarks/heads_table.py "$S/demo" "$S/bottle" "$S/mixed"
