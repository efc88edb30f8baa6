#!/usr/bin/env bash
# Chromium for the browser tests (tests/test_review_browser.py), from Debian's `chromium`
# package: Playwright drives the system browser (`playwright install` downloads are not used).
# Quick no-op when `chromium` is already on PATH.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install_browser: chromium is missing and this is not root: run 'apt-get install -y chromium' as root" >&2
    exit 1
  fi
  sudo="sudo"
fi
echo "install_browser: installing chromium (apt-get)"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
command -v chromium >/dev/null
