#!/usr/bin/env bash
# One device-tool run of the SD-1.4-size timings (random weights). Carry .whl (see ../shared/GPU.md):
# diffusers 0.42.1, importlib_metadata and open_clip_torch 3.3.0 wheels for Python 3.12.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/engine.py --scale sd14 --device cuda --repeats 3 --nti-steps 10 --json "$OUT/engine_sd14.json" 2>&1 | grep -v -i warn | tail -8
python3 benchmarks/dpl.py --scale sd14 --device cuda --iterations 10 --full-inversion --json "$OUT/dpl_sd14.json" 2>&1 | grep -v -i warn | tail -9
