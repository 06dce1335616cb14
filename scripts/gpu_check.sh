#!/usr/bin/env bash
# The GPU checks of tests/gpu, as one prepared script for a session that has a CUDA machine.
#
#   bash scripts/gpu_check.sh               # figures and logs in runs/gpu_check/
#   OUT=/path/to/dir bash scripts/gpu_check.sh
#
# It uses .venv when there is one (make test-gpu), else a python3 that already has torch with CUDA,
# else creates .venv (scripts/setup_venv.sh). It installs bitsandbytes from PyPI when missing (the
# QLoRA test skips, with its reason, where that fails), runs the GPU tests (about 2 minutes on one GPU,
# under 5), and writes to $OUT: gpu_figures.json (captions per second at batch 1 and 16, QLoRA step time
# and peak memory), test_gpu.log, environment.txt and nvidia-smi.txt. The exit status is pytest's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
elif python3 -c "import torch, transformers, peft, trl, datasets" 2>/dev/null; then
  PY=$(command -v python3)
else
  bash scripts/setup_venv.sh || { echo "gpu_check: could not create .venv" >&2; exit 2; }
  PY=.venv/bin/python
fi

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" > "$OUT/nvidia-smi.txt"
if ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
  echo "gpu_check: installing bitsandbytes (QLoRA 4-bit)"
  "$PY" -m pip install --disable-pip-version-check -q "bitsandbytes>=0.45" \
    || echo "gpu_check: bitsandbytes could not be installed; the QLoRA test will be skipped" >&2
fi
"$PY" - > "$OUT/environment.txt" 2>&1 <<'PYEOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
for name in ("transformers", "peft", "trl", "accelerate", "bitsandbytes", "deepspeed"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # noqa: BLE001 - report, never fail, here
        print(name, "not available:", type(err).__name__)
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i}", p.name, f"{p.total_memory / 1024**3:.1f} GiB", f"capability {p.major}.{p.minor}")
else:
    print("torch sees no CUDA GPU: every test in tests/gpu will be skipped")
PYEOF
cat "$OUT/environment.txt"

export BVIP_GPU_FIGURES="$OUT/gpu_figures.json"
if [[ "$PY" == ".venv/bin/python" ]]; then
  timeout 900 make test-gpu 2>&1 | tee "$OUT/test_gpu.log"
else  # the same command as `make test-gpu`, with the python found above
  timeout 900 "$PY" -m pytest tests/gpu -m gpu -q 2>&1 | tee "$OUT/test_gpu.log"
fi
status=${PIPESTATUS[0]}
echo "gpu_check: exit $status; figures in $BVIP_GPU_FIGURES (absent if nothing ran), log in $OUT/test_gpu.log"
exit "$status"
