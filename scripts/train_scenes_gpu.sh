#!/usr/bin/env bash
# Train a scene model further on a lent GPU (device tool, carry .whl; see ../shared/GPU.md), within a
# time limit, starting from a shipped model folder, and bring back what fits the tool's limits (8 files
# of at most 16 MiB): the trained UNet and text encoder (fp16 EMA safetensors; the VAE and tokenizer
# do not change) and dpl_edit.json (training progress), the loss log, a grid of samples and the
# quality table of `dpl check-scenes` run on the GPU.
#
#   SOURCE     model folder to continue (default: src/dpl_edit/scenes/weights, the bundled `scenes`)
#   GROUNDING  token grounding loss weight (default 0.01; 0 for `scenes-plain`)
#   MINUTES    training time limit, rendering and compilation included (default 8)
#   CHECK_S    seconds allowed for check-scenes (default 120)
#
# To ship: copy the returned unet.safetensors / text_encoder.safetensors / dpl_edit.json over
# SOURCE's unet/diffusion_pytorch_model.safetensors, text_encoder/model.safetensors and dpl_edit.json.
# Usage: SOURCE=src/dpl_edit/scenes/weights_plain GROUNDING=0 MINUTES=6 bash scripts/train_scenes_gpu.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
DEVICE=${DEVICE:-cuda}
SOURCE=${SOURCE:-src/dpl_edit/scenes/weights}
RUN=/tmp/scene-run
mkdir -p "$OUT" "$RUN"
[ -d "$RUN/checkpoint" ] || [ -d "$RUN/weights" ] || cp -r "$SOURCE" "$RUN/weights"
started=$(date +%s)
python3 -m dpl_edit.cli train-scenes --out "$RUN" --device "$DEVICE" --compile --batch-size 256 --vae-batch-size 128 \
    --grounding-weight "${GROUNDING:-0.01}" --time-limit "${MINUTES:-8}" --quiet 2>&1 | grep -v -i "warn" | tail -5
echo "training call: $(( $(date +%s) - started )) s"
python3 -m dpl_edit.cli train-scenes --out "$RUN" --device "$DEVICE" --batch-size 256 --vae-batch-size 128 \
    --grounding-weight "${GROUNDING:-0.01}" --export /tmp/export --quiet
cp /tmp/export/unet/diffusion_pytorch_model.safetensors "$OUT/unet.safetensors"
cp /tmp/export/text_encoder/model.safetensors "$OUT/text_encoder.safetensors"
cp /tmp/export/dpl_edit.json "$RUN/loss_log.jsonl" "$OUT/"
python3 - <<'PY'
import os, torch
from PIL import Image
from dpl_edit.models import StableDiffusion
from dpl_edit.scenes.render import split_scene, render
from dpl_edit.diffusion import DDIMSchedule
from dpl_edit.sampling import sample
from dpl_edit.images import to_pil
device = os.environ.get("DEVICE", "cuda")
model = StableDiffusion.from_pretrained("/tmp/export").to(device)
schedule = DDIMSchedule.from_scheduler(model.scheduler, 50)
scenes = [split_scene("test", i) for i in range(16)]
g = torch.Generator(device).manual_seed(0)
grid = Image.new("RGB", (64 * 16, 128))
for i, scene in enumerate(scenes):
    z = torch.randn(1, 4, 32, 32, generator=g, device=device)
    z0 = sample(model, z, schedule, model.encode_prompt(scene.caption), model.encode_prompt(""), 5.0, progress=False)
    grid.paste(render(scene)[0], (64 * i, 0))
    grid.paste(to_pil(model.decode_latents(z0)), (64 * i, 64))
grid.save(os.path.join(os.environ.get("OUT", "/tmp/out"), "samples.png"))
PY
tail -1 "$OUT/loss_log.jsonl"
started=$(date +%s)
timeout "${CHECK_S:-120}" python3 -m dpl_edit.cli check-scenes --model /tmp/export --device "$DEVICE" --quiet 2>&1 \
    | grep -v -i "warn" | tee "$OUT/check.txt" | tail -14
echo "check-scenes: $(( $(date +%s) - started )) s"
