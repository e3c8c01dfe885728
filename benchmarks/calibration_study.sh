#!/usr/bin/env bash
# Verdict calibration of a learned head, seen_shift = gap_spread (the default:
# location and spread), gap (location only) and none (the rule before them),
# on one trained CLAD run per data set: false alarms on good test images and recall on defective ones at the run's own thresholds.
# Test labels only measure; the thresholds come from training images alone.
# Usage: bash benchmarks/calibration_study.sh [STUDY_DIR]   (needs ../shared/data; ~60 min on 2 CPU cores)
source "$(dirname "$0")/study_common.sh"
PY=.venv/bin/python

[ -f "$S/transistor/config.toml" ] || $CLAD init "$S/transistor" --data "$MVTEC/transistor" --textures "$DTD"
mkdir -p "$S/seven-data"
for c in bottle transistor; do ln -sfn "$MVTEC/$c" "$S/seven-data/$c"; done
[ -d "$S/demo-data" ] || $CLAD demo-data "$S/demo-data"
for c in capsule grain speckle washer weave; do ln -sfn "$(cd "$S/demo-data/$c" && pwd)" "$S/seven-data/$c"; done
[ -f "$S/seven/config.toml" ] || $CLAD init "$S/seven" --data "$S/seven-data" --textures "$DTD"
[ -f "$S/bottle/config.toml" ] || $CLAD init "$S/bottle" --data "$MVTEC/bottle" --textures "$DTD"
[ -f "$S/demo/config.toml" ] || $CLAD init "$S/demo" --data "$S/demo-data"

for w in transistor seven bottle demo; do
  $CLAD extract "$S/$w"
  $CLAD train "$S/$w" --run clad-fast --head clad --profile fast
  for rule in none gap gap_spread; do  # the default last, so the run is left calibrated by it
    sed -i "s/^seen_shift = .*/seen_shift = \"$rule\"/" "$S/$w/config.toml"
    $PY benchmarks/verdicts.py "$S/$w" clad-fast "$w-clad-fast-$rule"
  done
  # the control: a cross-fitted head has no seen images, so its key and verdicts do not move
  $CLAD train "$S/$w" --run routed-knn --head routed_knn
  $PY benchmarks/verdicts.py "$S/$w" routed-knn "$w-routed-knn"
done

# RLR on the built-in set: a learned head whose held-out images score like its seen ones
$CLAD train "$S/demo" --run rlr-fast --head rlr --profile fast
for rule in none gap_spread; do
  sed -i "s/^seen_shift = .*/seen_shift = \"$rule\"/" "$S/demo/config.toml"
  $PY benchmarks/verdicts.py "$S/demo" rlr-fast "demo-rlr-fast-$rule"
done
