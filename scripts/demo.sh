#!/usr/bin/env bash
# The CPU demo on the embedded defaults: synthetic scenes -> dataset -> SFT from the committed base -> evaluation
# -> zero-shot backends beside it -> error gallery.
# Executed notebooks land in runs/demo/, figures in figures/, the leaderboard in runs/leaderboard.md.
# The notebooks' own defaults suit a real checkpoint; the demo's parameters come from bvip_helpers/demo/settings.py
# (`bvip demo params <notebook>`), and each executed notebook shows them in its injected-parameters cell.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
out=runs/demo
mkdir -p "$out"
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }

notebook() {
  local nb=$1
  [[ -f notebooks/$nb.ipynb ]] || { echo "skipping $nb (not in this checkout)"; return; }
  step "notebook $nb -> $out/$nb.ipynb"
  bvip demo params "$nb" --out "$out/$nb.params.yaml"
  if ! papermill "notebooks/$nb.ipynb" "$out/$nb.ipynb" -f "$out/$nb.params.yaml" --cwd notebooks \
      --log-output --no-progress-bar > "$out/$nb.log" 2>&1; then
    tail -n 40 "$out/$nb.log"
    echo "notebook $nb failed: the executed copy with the error is $out/$nb.ipynb"
    exit 1
  fi
  grep -vE "Executing|Ending Cell|^\s*$" "$out/$nb.log" | sed 's/^.*papermill[^ ]* - [A-Z]* - //' | tail -n 12
}

step "synthetic street scenes -> data/synthetic"
bvip synth --out_dir data/synthetic --n "${BVIP_DEMO_SCENES:-4000}" --seed 0
notebook 01_explore
notebook 02_build_dataset
step "copy-paste: one pasted copy of each training scene joins the SFT records"
bvip demo copy-paste --data_dir data/bvpi_out --image_root data/synthetic
notebook 03_sft
notebook 04_dpo
notebook 05_eval
notebook 00_zero_shot
notebook 06_error_gallery

step "done in $(( $(date +%s) - start ))s"
echo "figures:      $(ls figures/*.png 2>/dev/null | wc -l) PNGs in figures/"
if [[ -f runs/error_gallery/index.html ]]; then echo "error gallery: runs/error_gallery/index.html (open it in a browser)"; fi
if [[ -f runs/leaderboard.md ]]; then echo "leaderboard:  runs/leaderboard.md"; cat runs/leaderboard.md; fi
