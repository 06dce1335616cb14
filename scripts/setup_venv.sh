#!/usr/bin/env bash
# Create and fill .venv when missing or stale. Idempotent: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BVIP_VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp="$VENV/.bvip-installed"
want=$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
if [[ -x "$VENV/bin/python" ]]; then
  echo "[setup] updating $VENV (pyproject.toml or scripts/constraints.txt changed)"
else
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
pip_install() {  # quiet, minus the harmless notes some pip configs print for every package
  "$VENV/bin/python" -m pip --disable-pip-version-check -q install -c scripts/constraints.txt "$@" 2>&1 \
    | { grep -v "^WARNING: Location .* is ignored" || true; }
}
# torch first, pinned, so nothing pulls a different multi-GB build.
pip_install torch torchvision
pip_install -e ".[dev,metrics,export,serve]"
echo "$want" > "$stamp"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, transformers, trl, peft; print("torch", torch.__version__, "| transformers", transformers.__version__, "| trl", trl.__version__, "| peft", peft.__version__)')"
