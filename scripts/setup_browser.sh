#!/usr/bin/env bash
# Chromium for the real-browser test of `bvip report` (tests/test_report_browser.py), from Debian's archive:
# Playwright drives it through executable_path, since it cannot download its own browser builds here.
# Idempotent: does nothing when chromium is already installed. Never fails `make test`: where it cannot
# install (no apt, not root and no sudo, no network), it says why and the browser test skips with that reason.
set -uo pipefail
for name in chromium chromium-browser; do
  if command -v "$name" >/dev/null 2>&1; then
    exit 0
  fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup] chromium not installed and apt-get not available: install Chromium yourself for the browser test"
  exit 0
fi
if [[ $(id -u) -eq 0 ]]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "[setup] chromium not installed and apt-get needs root: run 'sudo apt-get install -y chromium' for the browser test"
  exit 0
fi
echo "[setup] installing chromium with apt-get (for the browser test of bvip report)"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! "${sudo[@]}" apt-get install -y -q chromium >"$log" 2>&1; then
  # a fresh image may have no package lists yet
  "${sudo[@]}" apt-get update -q >>"$log" 2>&1
  if ! "${sudo[@]}" apt-get install -y -q chromium >>"$log" 2>&1; then
    echo "[setup] apt-get install chromium failed (last lines of its log below); the browser test will skip"
    tail -n 5 "$log"
    rm -f "$log"
    exit 0
  fi
fi
rm -f "$log"
echo "[setup] $(chromium --version 2>/dev/null || echo chromium installed)"
