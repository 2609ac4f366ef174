#!/usr/bin/env bash
# CI: headless Chromium for tests/test_browser.py (the MLflow UI end to end). Debian/Ubuntu; needs root or sudo.
# Without it that test skips, so this script fails loudly instead of letting the check go missing.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: no apt-get here; install Chromium yourself (the UI test needs a 'chromium' on PATH)" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium
chromium --version
