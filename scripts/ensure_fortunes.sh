#!/usr/bin/env bash
# The language-model tests, demo and benchmarks train a small GPT-2 on real short texts: Debian's `fortunes`
# package (/usr/share/games/fortunes/, entries separated by lines holding "%"). Install it where it is missing
# (GRADTRACE_FORTUNES names another folder of fortune files explicitly); elsewhere say what to do.
set -euo pipefail
DIR="${GRADTRACE_FORTUNES:-/usr/share/games/fortunes}"
if [ -f "$DIR/fortunes" ] || { [ -n "${GRADTRACE_FORTUNES:-}" ] && [ -d "$DIR" ]; }; then
  exit 0
fi
if command -v apt-get >/dev/null; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  echo "installing Debian's fortunes for the language-model tests ..."
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq fortunes >/dev/null
  exit 0
fi
echo "no fortune files in $DIR and no apt-get: install the fortunes package, or set GRADTRACE_FORTUNES to a folder of fortune files" >&2
exit 1
