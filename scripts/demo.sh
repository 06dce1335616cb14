#!/usr/bin/env bash
# The CPU demo pipeline on the embedded defaults: synthetic scenes -> dataset -> SFT -> evaluation.
# Executed notebooks land in runs/demo/, figures in figures/, the leaderboard in runs/leaderboard.md.
# Rerunning is cheap: the scenes are redrawn identically in seconds, and the pre-trained twin is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
out=runs/demo
mkdir -p "$out"
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }

step "synthetic street scenes -> data/synthetic"
bvip synth --out_dir data/synthetic --n "${BVIP_DEMO_SCENES:-4000}" --seed 0

for nb in 01_explore 02_build_dataset 03_sft 05_eval; do
  [[ -f notebooks/$nb.ipynb ]] || { echo "skipping $nb (not in this checkout)"; continue; }
  step "notebook $nb -> $out/$nb.ipynb"
  if ! papermill "notebooks/$nb.ipynb" "$out/$nb.ipynb" --cwd notebooks --log-output --no-progress-bar \
      > "$out/$nb.log" 2>&1; then
    tail -n 40 "$out/$nb.log"
    echo "notebook $nb failed: the executed copy with the error is $out/$nb.ipynb"
    exit 1
  fi
  grep -vE "Executing|Ending Cell|^\s*$" "$out/$nb.log" | sed 's/^.*papermill[^ ]* - [A-Z]* - //' | tail -n 12
done

step "done in $(( $(date +%s) - start ))s"
echo "figures:      $(ls figures/*.png 2>/dev/null | wc -l) PNGs in figures/"
if [[ -f runs/leaderboard.md ]]; then echo "leaderboard:  runs/leaderboard.md"; cat runs/leaderboard.md; fi
