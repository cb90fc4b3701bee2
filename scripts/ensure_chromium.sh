#!/usr/bin/env bash
# The report tests open gradtrace's HTML page in a real headless Chromium. Install Debian's chromium where no
# Chromium/Chrome is found (GRADTRACE_BROWSER names one explicitly); elsewhere say what to do.
set -euo pipefail
if [ -n "${GRADTRACE_BROWSER:-}" ] || command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
    || command -v google-chrome >/dev/null || command -v google-chrome-stable >/dev/null; then
  exit 0
fi
if command -v apt-get >/dev/null; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  echo "installing Debian's chromium for the HTML report tests ..."
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  exit 0
fi
echo "no Chromium found and no apt-get: install Chromium or Chrome, or set GRADTRACE_BROWSER to its executable" >&2
exit 1
