#!/usr/bin/env bash
# Train the scene model further on a lent GPU (device tool, carry .whl; see ../shared/GPU.md), within a
# time limit, starting from the bundled model (src/dpl_edit/scenes/weights), and bring back what fits
# the tool's limits: the exported model (fp16 EMA weights; copy it over the bundled folder to ship
# it, or into a training folder's weights/ to resume), the loss log and a grid of samples.
# Usage: MINUTES=8 bash scripts/train_scenes_gpu.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/out}
RUN=/tmp/scene-run
mkdir -p "$OUT" "$RUN"
[ -d "$RUN/checkpoint" ] || cp -r src/dpl_edit/scenes/weights "$RUN/weights"
python3 -m dpl_edit.cli train-scenes --out "$RUN" --device cuda --compile --batch-size 256 --vae-batch-size 128 \
    --time-limit "${MINUTES:-8}" --quiet 2>&1 | grep -v -i "warn" | tail -5
python3 -m dpl_edit.cli train-scenes --out "$RUN" --device cuda --export "$OUT/weights" --quiet
cp "$RUN/loss_log.jsonl" "$OUT/"
python3 - <<'PY'
import os, torch
from PIL import Image
from dpl_edit.scenes.train import SceneTrainer, TrainConfig
from dpl_edit.scenes.render import split_scene, render
from dpl_edit.diffusion import DDIMSchedule
from dpl_edit.sampling import sample
from dpl_edit.images import to_pil
trainer = SceneTrainer(TrainConfig(), "/tmp/scene-run", device="cuda")
trainer.resume()
model = trainer.ema_model()
schedule = DDIMSchedule.from_scheduler(model.scheduler, 50)
scenes = [split_scene("test", i) for i in range(16)]
g = torch.Generator("cuda").manual_seed(0)
grid = Image.new("RGB", (64 * 16, 128))
for i, scene in enumerate(scenes):
    z = torch.randn(1, 4, 32, 32, generator=g, device="cuda")
    z0 = sample(model, z, schedule, model.encode_prompt(scene.caption), model.encode_prompt(""), 5.0, progress=False)
    grid.paste(render(scene)[0], (64 * i, 0))
    grid.paste(to_pil(model.decode_latents(z0)), (64 * i, 64))
grid.save(os.path.join(os.environ.get("OUT", "/tmp/out"), "samples.png"))
print("\n".join(s.caption for s in scenes[:4]))
PY
tail -2 "$OUT/loss_log.jsonl"
