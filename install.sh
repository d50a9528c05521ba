#!/usr/bin/env bash
# Create .venv and install dpl-edit with its test dependencies.
# torch is pinned first so pip takes the CPU build where one is on disk (and the platform's build
# elsewhere); open_clip_torch only provides the CLIP BPE vocabulary, so its dependencies
# (torchvision among them) are left out on purpose. The web page's browser test drives Debian's
# chromium through chromium-driver: installed with apt-get when missing (as root), else named.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q --no-deps "open_clip_torch==3.3.0"
.venv/bin/python -m pip install -q -e ".[test]"
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } \
            || echo "Could not install chromium and chromium-driver with apt-get; the page test will say so" >&2
    else
        echo "The page test needs a browser: sudo apt-get install chromium chromium-driver" >&2
    fi
fi
