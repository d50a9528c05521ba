#!/usr/bin/env bash
# Issue 11's GPU table in one or two device calls (1,100 s of phase limits; PHASES splits them):
# SD-1.4-sized random weights, worst case (no loss meets its threshold), beside the authors' DPL
# schedule in the same process. Carry .whl: Python 3.12 wheels of diffusers 0.42.1, importlib_metadata
# and open_clip_torch 3.3.0 (the CLIP vocabulary of the random SD-1.4 model's tokenizer), made once here
# (see ../shared/GPU.md) with
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata open_clip_torch==3.3.0
# Each phase's JSON file and one log of them all (run.log) come back under $OUT (8 files: the device
# tool takes back at most 8), each phase under its own time limit. The phases, in this order:
#
#   tests          the CUDA-graph tests on the GPU (tests/test_cuda_graphs.py -k real)
#   graphs-fp32    benchmarks/inversion.py's rows (NTI, DPL, DPL + direct inversion, a P2P edit) with
#                  CUDA graphs (use_cuda_graphs: captured eager kernels; the warm-up column holds the
#                  captures) in fp32, the authors' DPL last in the same process (AUTHORS=0: not)
#   graphs-bf16    the same rows with CUDA graphs in bf16
#   lockstep       benchmarks/lockstep.py: 4 images one by one and in lockstep (invert_many), NTI and
#                  DPL, with CUDA graphs (DPL's token steps as one capture of the whole batch), fp32
#   lockstep-bf16  the same in bf16
#   eager-fp32     the rows of graphs-fp32, eager (no authors' row)
#   eager-bf16     the same in bf16
#   precision      benchmarks/precision.py --dtype float16: what float16 does to the scene model's
#                  reconstructions and edits against float32 (4 test scenes, 20 steps; CUDA only: a CPU
#                  has no fast float16 kernels)
#   probe          scripts/speed_probe.py --mode cuda-graphs --dtype bfloat16 --profile: the graphed
#                  UNet's ms per call (also with cudnn.benchmark, the weights in NCHW and both), DPL's
#                  token step alone (21 iterations), the eager UNet and the VAE decode in both layouts,
#                  a profile of one DPL step
#   The inversion rows time 10-step and 2-step schedules and extrapolate to 50 (exact in the worst
#   case, where every step runs the same iterations); each row is saved as soon as it is measured,
#   in case time runs out. A batch item costs one inversion and one edit: images per hour follow.
#   torch.compile's CUDA graphs are left out: on the H200 each new graph took 45-90 s of inductor
#   compilation and DPL's graphs outran a 6-minute run (scripts/speed_probe.py times them).
#
# Usage: bash scripts/speed_gpu.sh                              (every phase)
#        PHASES="tests graphs-bf16" bash scripts/speed_gpu.sh   (some of them, in the order above)
# In a 15-minute lease, two calls (timeout_s 360 and 420), the second at once while the machine is
# warm. On 2026-11-30 the first took 277 s (319 s of the lease with the machine's start) and
# `AUTHORS=0 PHASES="graphs-fp32 lockstep precision"` 256 s (precision is measured now; the fp32
# lockstep ran out of its time then); the second below, with the authors' row (about 110 s), should
# take about 350 s:
#        PHASES="tests graphs-bf16 lockstep-bf16 probe" bash scripts/speed_gpu.sh
#        PHASES="graphs-fp32 lockstep" bash scripts/speed_gpu.sh
# Dry run on the CPU machine (same rows, tiny model, one step; eager, since CUDA graphs need CUDA):
#   PYTHON=.venv/bin/python MODEL=tiny DEVICE=cpu STEPS=1 OUT=/tmp/dry bash scripts/speed_gpu.sh
PYTHON=${PYTHON:-python3} MODEL=${MODEL:-sd14} DEVICE=${DEVICE:-cuda} STEPS=${STEPS:-10}
[[ $PYTHON == */* ]] && PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")  # still found after the cd below
$PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# src as an absolute path: the runs start in benchmarks/
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
PHASES=" ${PHASES:-tests graphs-fp32 graphs-bf16 lockstep lockstep-bf16 eager-fp32 eager-bf16 precision probe} "
want() { [[ $PHASES == *" $1 "* ]]; }
mkdir -p "$OUT"
if [[ $DEVICE == cuda* ]] && want tests; then  # the CUDA-graph path on the real thing first
    echo "== CUDA-graph tests"
    timeout 60 "$PYTHON" -m pytest -q -rA -p no:cacheprovider tests/test_cuda_graphs.py -k real 2>&1 | tee -a "$OUT/run.log" | tail -5
fi
cd benchmarks || exit 1
run() {  # name, seconds, arguments...
    local name=$1 limit=$2
    shift 2
    want "$name" || return 0
    echo "== $name"
    timeout "$limit" "$PYTHON" inversion.py --model "$MODEL" --device "$DEVICE" --steps "$STEPS" --json "$OUT/$name.json" "$@" 2>&1 \
        | tee -a "$OUT/run.log" | tail -20
}
graphs=--cuda-graphs
[[ $DEVICE == cuda* ]] || graphs=
lockstep() {  # name, dtype, seconds
    want "$1" || return 0
    echo "== $1"
    timeout "$3" "$PYTHON" lockstep.py --model "$MODEL" --device "$DEVICE" --dtype "$2" --images 4 \
        --steps "$(( STEPS < 3 ? STEPS : 3 ))" $graphs --json "$OUT/$1.json" 2>&1 | tee -a "$OUT/run.log" | tail -6
}
# AUTHORS=0 leaves the authors' row out of graphs-fp32 (it alone takes about 110 s on an H200)
run graphs-fp32 240 $graphs $([[ ${AUTHORS:-1} == 0 ]] && echo --skip-authors)
run graphs-bf16 80 $graphs --dtype bfloat16 --skip-authors
lockstep lockstep float32 180  # ran out of 100 s on the H200 (2026-11-30), before its one-by-one warm-up
lockstep lockstep-bf16 bfloat16 120
run eager-fp32 130 --skip-authors
run eager-bf16 150 --dtype bfloat16 --skip-authors  # 2 of its 4 rows in 100 s on the H200
if [[ $DEVICE == cuda* ]] && want precision; then
    echo "== precision (float16 against float32, scene model)"
    timeout 150 "$PYTHON" precision.py --device "$DEVICE" --dtype float16 --scenes 4 --steps 20 \
        --json "$OUT/precision-fp16.json" 2>&1 | tee -a "$OUT/run.log" | tail -14
fi
cd .. || exit 1
if [[ $DEVICE == cuda* ]] && want probe; then
    echo "== probe (bfloat16)"
    timeout 90 "$PYTHON" scripts/speed_probe.py --model "$MODEL" --device "$DEVICE" --dtype bfloat16 --mode cuda-graphs \
        --profile 2>&1 | tee -a "$OUT/run.log" | grep '^{'
fi
