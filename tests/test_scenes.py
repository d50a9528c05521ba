"""Scene renderer, edit oracle, splits, and the training pipeline on CPU."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from dpl_edit import DplEditError, StableDiffusion
from dpl_edit.diffusion import DDIMSchedule
from dpl_edit.images import to_pil
from dpl_edit.sampling import sample
from dpl_edit.scenes.render import (
    COLOURS,
    SIZE,
    WordSwap,
    render,
    sample_scene,
    scene_seed,
    split_scene,
    swap_word,
)
from dpl_edit.scenes.train import SceneTrainer, TrainConfig


def test_rendering_is_deterministic():
    a, b = render(split_scene("train", 7)), render(split_scene("train", 7))
    assert a[0].tobytes() == b[0].tobytes()
    assert all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))
    assert render(split_scene("train", 8))[0].tobytes() != a[0].tobytes()


@pytest.mark.parametrize("index", range(20))
def test_masks_are_exactly_the_drawn_pixels(index):
    scene = split_scene("validation", index)
    image, masks = render(scene)
    pixels = np.asarray(image)
    assert len(masks) == len(scene.objects) and image.size == (SIZE, SIZE)
    for obj, mask in zip(scene.objects, masks):
        assert mask.sum() > 50
        assert (pixels[mask] == COLOURS[obj.colour]).all()
    union = np.any(masks, axis=0)
    assert sum(m.sum() for m in masks) == union.sum()  # objects never overlap
    plain = scene.__class__(scene.background, (), scene.seed)
    assert np.array_equal(np.asarray(render(plain)[0])[~union], pixels[~union])


def test_captions():
    scene = sample_scene(3, num_objects=2)
    a, b = scene.objects
    assert scene.caption == f"a {a.colour} {a.shape} and a {b.colour} {b.shape} on {scene.background}"
    assert scene.marked_caption() == f"a {a.colour} {{{a.shape}}} and a {b.colour} {{{b.shape}}} on {scene.background}"
    assert a.x <= b.x


@pytest.mark.parametrize("index", range(10))
def test_the_oracle_changes_only_what_the_edit_names(index):
    scene = split_scene("test", index, num_objects=2)
    image, masks = render(scene)
    pixels = np.asarray(image)
    for edit in (WordSwap("shape", "triangle", 0), WordSwap("colour", "purple", 1)):
        edited = swap_word(scene, edit)
        new_pixels, new_masks = render(edited)
        new_pixels = np.asarray(new_pixels)
        touched = masks[edit.index] | new_masks[edit.index]
        assert np.array_equal(new_pixels[~touched], pixels[~touched])
        assert edited.caption == scene.caption.replace(edit.source_word(scene), edit.new, 1) or edit.index == 1
    edited = swap_word(scene, WordSwap("background", "water" if scene.background != "water" else "sand"))
    new_pixels, new_masks = render(edited)
    objects = np.any(masks, axis=0)
    assert np.array_equal(np.asarray(new_pixels)[objects], pixels[objects])
    assert not np.array_equal(np.asarray(new_pixels)[~objects], pixels[~objects])


def test_splits_are_disjoint():
    assert scene_seed("train", 9_999_999) < scene_seed("validation", 0) < scene_seed("test", 0)
    with pytest.raises(ValueError):
        scene_seed("train", 10_000_000)
    with pytest.raises(ValueError):
        scene_seed("holdout", 0)


TINY_RUN = TrainConfig(train_scenes=32, vae_steps=2, vae_batch_size=4, diffusion_steps=3, batch_size=4,
                       checkpoint_every=100, warmup_steps=2)


def test_training_exports_a_model_the_engine_loads_offline(tmp_path):
    trainer = SceneTrainer(TINY_RUN, tmp_path / "run")
    assert trainer.run(progress=False)
    model = StableDiffusion.from_pretrained(tmp_path / "run" / "model")
    assert model.image_size == SIZE and model.settings["dpl"]["cross_resolution"] == 16
    assert model.vae.config.scaling_factor == pytest.approx(trainer.scaling_factor)
    schedule = DDIMSchedule.from_scheduler(model.scheduler, 5)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)).half()
    cond, null = model.encode_prompt("a red circle on grass"), model.encode_prompt("")
    image = to_pil(model.decode_latents(sample(model, z, schedule, cond, null, 5.0, progress=False)))
    assert image.size == (SIZE, SIZE)
    log = (tmp_path / "run" / "loss_log.jsonl").read_text()
    assert log.count("diffusion") >= 1 and "grounding" in log  # the grounding loss is on by default


def test_training_resumes_exactly(tmp_path):
    straight = SceneTrainer(TINY_RUN, tmp_path / "a")
    straight.run(progress=False)
    while not SceneTrainer(TINY_RUN, tmp_path / "b").run(time_limit=0, progress=False):
        pass  # one step per run: stop, checkpoint, resume
    resumed = SceneTrainer(TINY_RUN, tmp_path / "b")
    resumed.resume()
    for name, value in straight.ema.items():
        torch.testing.assert_close(resumed.ema[name], value, rtol=0, atol=0)


def test_a_killed_training_run_saves_its_checkpoint(tmp_path):
    """A SIGTERM (``kill``, a batch system's stop or time limit) is a Ctrl-C to ``dpl``: the run saves
    where it is (no checkpoint is due here before it) and says so in one line."""
    run = subprocess.Popen(
        [sys.executable, "-m", "dpl_edit.cli", "train-scenes", "--out", str(tmp_path), "--vae-steps", "100000",
         "--vae-batch-size", "2", "--train-scenes", "8", "--checkpoint-every", "100000", "--device", "cpu", "--quiet"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE, text=True)
    log, deadline = tmp_path / "loss_log.jsonl", time.monotonic() + 120
    while not (log.is_file() and log.read_text()) and time.monotonic() < deadline:  # 50 steps are done
        time.sleep(0.1)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and err.count("interrupted") == 1, err
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["stage"] == "vae" and state["step"] >= 50


def test_training_resumes_from_an_exported_model(tmp_path, caplog):
    first = SceneTrainer(TINY_RUN, tmp_path / "a")
    while (first.stage, first.step) != ("diffusion", 1):  # one step per run, into the UNet stage
        first = SceneTrainer(TINY_RUN, tmp_path / "a")
        first.run(time_limit=0, progress=False)
    training = {name: value.clone() for name, value in first.model.unet.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="dpl_edit"):
        first.export(tmp_path / "b" / "weights")
    assert "float16 on the CPU" not in caplog.text  # a float16 copy is written; nothing runs in it
    # the model in training keeps its own float32 weights (neither the EMA's nor rounded ones)
    assert first.model.unet.training and any(p.requires_grad for p in first.model.unet.parameters())
    for name, value in first.model.unet.state_dict().items():
        assert torch.equal(training[name], value), name
    unet = {name[len("unet."):]: value for name, value in first.ema.items() if name.startswith("unet.")}
    assert unet and any(not torch.equal(training[name], value) for name, value in unet.items())
    exported = StableDiffusion.from_pretrained(tmp_path / "b" / "weights")
    for name, value in unet.items():  # the export holds the EMA weights
        assert torch.equal(exported.unet.state_dict()[name].float(), value.half().float()), name
    resumed = SceneTrainer(replace(TINY_RUN, diffusion_steps=5), tmp_path / "b")
    resumed.resume()
    assert (resumed.stage, resumed.step) == ("diffusion", 1) and resumed.optimizer_state is None
    for name, value in exported.unet.state_dict().items():
        torch.testing.assert_close(resumed.model.unet.state_dict()[name], value.float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="other settings"):
        SceneTrainer(replace(TINY_RUN, seed=1), tmp_path / "b").resume()


@pytest.mark.parametrize("text", ["{cut", "[]", '{"stage": "vae"}'])
def test_a_damaged_checkpoint_state_is_said_to_be_one(tmp_path, text, capsys):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.json").write_text(text)
    with pytest.raises(DplEditError, match="state.json holds no training progress that can be read .*move its folder"):
        SceneTrainer(TINY_RUN, tmp_path).resume()
    from dpl_edit.cli import main

    assert main(["train-scenes", "--out", str(tmp_path), "--export", str(tmp_path / "model")]) == 2
    assert "holds no training progress" in capsys.readouterr().err


def test_exporting_a_folder_without_a_training_run_is_refused(tmp_path, capsys):
    from dpl_edit.cli import main

    assert main(["train-scenes", "--out", str(tmp_path / "typo"), "--export", str(tmp_path / "model")]) == 2
    assert "holds no training run to export" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists() and not (tmp_path / "model").exists()


def test_grounding_loss_is_zero_inside_the_mask_and_ignores_absent_objects():
    from dpl_edit.scenes.grounding import token_grounding_loss

    mask = torch.zeros(1, 2, 16)
    mask[0, 0, :4] = 1.0  # object 0 covers the first 4 of 16 cells
    tokens = torch.zeros(1, 2, 77)
    tokens[0, 0, 3] = 1.0  # object 1 is absent (no noun tokens)
    inside = torch.zeros(1, 2, 16, 77)
    inside[:, :, :4, 3] = 0.25
    assert token_grounding_loss(inside, tokens, mask).item() == pytest.approx(0.0)
    uniform = torch.full((1, 2, 16, 77), 1 / 77)
    assert token_grounding_loss(uniform, tokens, mask).item() == pytest.approx((1 - 4 / 16) ** 2)


def test_caption_checker_accepts_every_rendered_scene_and_rejects_swaps():
    from dpl_edit.scenes.classify import check_caption

    for index in range(60):
        scene = split_scene("validation", index)
        image, _ = render(scene)
        check = check_caption(image, scene)
        assert check.background and all(check.colours) and all(check.shapes), scene.caption
        other = "triangle" if scene.objects[0].shape != "triangle" else "square"
        wrong = check_caption(render(swap_word(scene, WordSwap("shape", other, 0)))[0], scene)
        assert not all(wrong.shapes)
