#!/usr/bin/env bash
# Create .venv and install dpl-edit with its test dependencies.
# torch is pinned first so pip takes the CPU build where one is on disk (and the platform's build
# elsewhere); open_clip_torch only provides the CLIP BPE vocabulary, so its dependencies
# (torchvision among them) are left out on purpose.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q --no-deps "open_clip_torch==3.3.0"
.venv/bin/python -m pip install -q -e ".[test]"
