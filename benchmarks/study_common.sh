# Shared by the study scripts (sourced, not run): paths, the clad command and train_eval.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[1]}")/.."
CLAD=${CLAD:-.venv/bin/clad}
S=${1:-work/study}
SHARED=$(cd .. && pwd)/shared/data
MVTEC=$SHARED/mvtec_ad
DTD=$SHARED/dtd_small/dtd
mkdir -p "$S"

train_eval() {  # WORK RUN [train args...]
  local work=$1 run=$2; shift 2
  $CLAD train "$work" --run "$run" "$@"
  $CLAD evaluate "$work" --run "$run"
}
