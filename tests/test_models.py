import copy
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from dpl_edit import ModelLoadError, PromptError, StableDiffusion
from dpl_edit.attention import AttentionStore, attention_hook, attention_layers, select_layers
from dpl_edit.models import RECOMPILE_LIMIT, WEIGHTED, fingerprints_match
from dpl_edit.random_models import tiny_model


def test_save_and_load_a_diffusers_folder_offline(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    loaded = StableDiffusion.from_pretrained(tmp_path / "m")
    assert fingerprints_match(loaded.fingerprint(), model.fingerprint())
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    assert list((tmp_path / "m" / "unet").glob("*.safetensors"))
    cfg = loaded.scheduler.config
    assert (cfg.clip_sample, cfg.set_alpha_to_one, cfg.steps_offset) == (False, False, 1)
    z = torch.randn(1, 4, 32, 32)
    s = model.encode_prompt("a cat")
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(z, 501, s), model.predict(z, 501, s))


def test_a_folder_named_from_the_working_directory_is_recorded_by_its_whole_path(model, tmp_path, monkeypatch,
                                                                                   capsys):
    """An inversion records its model's folder as an absolute path, so `dpl edit` finds it from any
    working directory; where the folder is gone, the message says whose model it was and what to do."""
    from dpl_edit.cli import main

    model.save_pretrained(tmp_path / "sd")
    monkeypatch.chdir(tmp_path)
    assert StableDiffusion.from_pretrained("sd").model_id == str(tmp_path / "sd")
    Image.new("RGB", (128, 128), (40, 90, 200)).save(tmp_path / "picture.png")
    assert main(["invert", "picture.png", "--prompt", "a cat", "--model", "sd", "--steps", "1", "--out", "inv",
                 "--quiet"]) == 0
    (tmp_path / "sd").rename(tmp_path / "moved")
    assert main(["edit", "inv", "--target", "a dog", "--quiet"]) == 2
    assert f"The inversion was made with model '{tmp_path / 'sd'}', which does not load here: give its folder or " \
           "hub id with --model" in capsys.readouterr().err
    assert main(["edit", "inv", "--target", "a dog", "--model", "moved", "--quiet"]) == 0


def test_a_model_built_in_memory_keeps_its_fingerprint_when_saved_and_loaded(tmp_path):
    built = tiny_model(seed=0)
    before = built.fingerprint()
    built.save_pretrained(tmp_path / "m")  # (transformers adds the class name to the text encoder's config)
    assert built.fingerprint() == before
    assert StableDiffusion.from_pretrained(tmp_path / "m").fingerprint()["architecture"] == before["architecture"]


def test_half_precision_copy_keeps_the_fingerprint(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    half = StableDiffusion.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 == half.unet.dtype and half.device == half.unet.device  # O(1) reads agree
    assert fingerprints_match(half.fingerprint(), model.fingerprint())


def test_float16_on_the_cpu_warns_that_it_is_slow(caplog):
    with caplog.at_level(logging.WARNING, logger="dpl_edit"):
        tiny_model(seed=0).to(dtype=torch.bfloat16)
        assert "float16 on the CPU" not in caplog.text
        tiny_model(seed=0).to(dtype=torch.float16)
    assert "float16 on the CPU has no fast kernels" in caplog.text and "bfloat16 or float32" in caplog.text


def test_missing_and_malformed_models_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not in the local cache|could be fetched"):
        StableDiffusion.from_pretrained("nobody/no-such-model")
    for folder in (tmp_path / "no-such-folder", "./models/sd", "~/models/no-such-folder", "models/sd/v1-4"):
        with pytest.raises(ModelLoadError, match="there is no folder at .*existing diffusers folder"):
            StableDiffusion.from_pretrained(folder)  # a path, not a hub id: said without asking the hub
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="lacks tokenizer/, text_encoder/, vae/, scheduler/"):
        StableDiffusion.from_pretrained(tmp_path)


@pytest.mark.parametrize(("text", "message"), [
    ("{bad", "is not valid JSON"),
    ("[1]", 'must be a JSON object whose "dpl" and "edit" entries are objects'),
    ('{"dpl": 16}', 'must be a JSON object whose "dpl" and "edit" entries are objects'),
    ('{"dpl": {"cross_res": 16}}', "names no dpl setting cross_res (it may recommend cross_resolution, "),
    ('{"dpl": {"cross_resolution": 0}}', "recommends dpl settings that cannot be used: DPL cross_resolution must be"),
    ('{"edit": {"mode": "refine"}}', "names no edit setting mode (it may recommend target_tokens)"),
    ('{"edit": {"target_tokens": "all"}}', "recommends edit settings that cannot be used: Unknown target_tokens 'all'"),
])
def test_a_model_s_recommended_settings_are_checked_when_it_loads(model, tmp_path, text, message):
    """A mistyped dpl_edit.json is said to be the model's file when the model loads: not a TypeError
    (a bug, to `dpl`) nor, later, an error that names an option the user never gave."""
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "dpl_edit.json").write_text(text)
    with pytest.raises(ModelLoadError, match=re.escape(f"{tmp_path / 'm' / 'dpl_edit.json'} (the settings this "
                                                       f"model recommends) ") + ".*" + re.escape(message)):
        StableDiffusion.from_pretrained(tmp_path / "m")


def test_the_bundled_models_recommend_settings_that_load():
    from dpl_edit.registry import load_model

    assert load_model("scenes-plain", cuda_graphs=False).settings["edit"] == {"target_tokens": "auto"}


@pytest.mark.parametrize(("change", "message"), [
    ({"addition_embed_type": "text_time"}, r"takes extra conditioning \(addition_embed_type 'text_time', as SDXL's\)"),
    ({"class_embed_type": "timestep"}, r"takes a class embedding \(class_embed_type 'timestep'"),
    ({"in_channels": 9}, r"takes 9 input channels where the VAE's latents have 4 \(an inpainting"),
    ({"cross_attention_dim": 64}, r"attends to text states 64 wide where the text encoder's are 32"),
])
def test_other_diffusers_models_are_refused_before_their_weights_load(model, tmp_path, monkeypatch, change, message):
    model.save_pretrained(tmp_path / "m")
    config = tmp_path / "m" / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", None)  # never reached
    with pytest.raises(ModelLoadError, match="dpl-edit edits with text-to-image Stable Diffusion 1.x and 2.x, and its "
                                             "UNet " + message):
        StableDiffusion.from_pretrained(tmp_path / "m")


def _save_fp16_variant(model, folder, keep_plain):
    """``folder`` as ``StableDiffusionPipeline.save_pretrained(variant="fp16")`` writes it (half
    weights in ``*.fp16.safetensors``), with or without the plain weights beside them."""
    model.save_pretrained(folder)
    for name in WEIGHTED:
        if not keep_plain:
            for plain in (folder / name).glob("*.safetensors"):
                plain.unlink()
        half = copy.deepcopy(getattr(model, name)).to(torch.float16)  # (the shared fixture stays as it is)
        half.save_pretrained(folder / name, variant="fp16", safe_serialization=True)


def _unet_weight(model):
    return model.unet.conv_in.weight.detach().clone()


def test_a_folder_with_only_fp16_weights_loads_them_and_one_with_both_reads_the_plain_ones(model, tmp_path, caplog):
    _save_fp16_variant(model, tmp_path / "half", keep_plain=False)
    assert sorted(p.name for p in (tmp_path / "half" / "unet").glob("*.safetensors")) == [
        "diffusion_pytorch_model.fp16.safetensors"]
    with caplog.at_level(logging.INFO, logger="dpl_edit"):
        half = StableDiffusion.from_pretrained(tmp_path / "half")  # diffusers alone: "no file named ..."
    assert "no plain safetensors weights in text_encoder/, unet/, vae/; reading its 'fp16' ones" in caplog.text
    assert half.dtype == torch.float32 and fingerprints_match(half.fingerprint(), model.fingerprint())
    torch.testing.assert_close(_unet_weight(half), _unet_weight(model).half().float(), rtol=0, atol=0)
    with pytest.raises(ModelLoadError, match=r"text_encoder/ has no 'non_ema' weights \(its safetensors weights: fp16\)"):
        StableDiffusion.from_pretrained(tmp_path / "half", variant="non_ema")

    _save_fp16_variant(model, tmp_path / "both", keep_plain=True)
    torch.testing.assert_close(_unet_weight(StableDiffusion.from_pretrained(tmp_path / "both")), _unet_weight(model),
                               rtol=0, atol=0)
    chosen = StableDiffusion.from_pretrained(tmp_path / "both", variant="fp16")
    torch.testing.assert_close(_unet_weight(chosen), _unet_weight(model).half().float(), rtol=0, atol=0)

    for plain in (tmp_path / "both" / "unet").glob("diffusion_pytorch_model.safetensors"):
        plain.rename(plain.with_name("diffusion_pytorch_model.non_ema.safetensors"))
    with pytest.raises(ModelLoadError, match="unet/ has no plain safetensors weights but several variants "
                                             r"\(fp16, non_ema\)\. Choose one \(--variant"):
        StableDiffusion.from_pretrained(tmp_path / "both")


def test_an_inversion_made_from_a_variant_is_edited_with_the_same_weights(model, tmp_path, capsys):
    from dpl_edit import Inversion
    from dpl_edit.cli import main
    from dpl_edit.images import to_pil

    _save_fp16_variant(model, tmp_path / "both", keep_plain=True)
    to_pil(torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1).save(tmp_path / "x.png")
    assert main(["invert", str(tmp_path / "x.png"), "--prompt", "a cat", "--model", str(tmp_path / "both"),
                 "--variant", "fp16", "--steps", "2", "--out", str(tmp_path / "inv")]) == 0
    assert Inversion.load(tmp_path / "inv").settings["variant"] == "fp16"
    capsys.readouterr()
    for argv, weights in ([[], "float32, its fp16 weights"], [["--model", str(tmp_path / "both")], "(float32)"]):
        assert main(["reconstruct", str(tmp_path / "inv"), "--out", str(tmp_path / "r.png"), *argv]) == 0
        assert weights in capsys.readouterr().err  # --model: that model as it says (its plain weights)


def test_a_hub_id_loads_offline_from_the_cache_with_only_fp16_weights(model, tmp_path):
    """A hub id as the Hugging Face cache holds it after ``from_pretrained(..., variant="fp16")``,
    read by a fresh process with the hub offline (the cache's location is read at import)."""
    snapshot = tmp_path / "hub" / "models--someone--tiny-sd" / "snapshots" / ("0" * 40)
    _save_fp16_variant(model, snapshot, keep_plain=False)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    (snapshot / "dpl_edit.json").write_text(json.dumps({"edit": {"target_tokens": "auto"}}))  # what it recommends
    expected = model.fingerprint()
    code = ("import json, sys; from dpl_edit import load_model; m = load_model('someone/tiny-sd'); "
            "print(json.dumps([m.fingerprint(), m.settings]))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    fingerprint, settings = json.loads(done.stdout.strip().splitlines()[-1])
    assert fingerprints_match(fingerprint, expected) and settings == {"edit": {"target_tokens": "auto"}}
    # the cache's folder of the model, as a path: read as the snapshot its main ref names
    assert fingerprints_match(StableDiffusion.from_pretrained(snapshot.parents[1]).fingerprint(), expected)


@pytest.mark.parametrize(("file", "message"), [
    ("v1-5-pruned-emaonly.safetensors", "is a single-file checkpoint; dpl-edit reads diffusers folders"),
    ("sd-v1-4.ckpt", "StableDiffusionPipeline.from_single_file(PATH).save_pretrained(FOLDER)"),
    ("notes.txt", "is a file; dpl-edit reads diffusers folders"),
])
def test_a_file_for_a_model_is_said_to_be_no_diffusers_folder(tmp_path, file, message):
    (tmp_path / file).write_bytes(b"")
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        StableDiffusion.from_pretrained(tmp_path / file)


def test_pickle_weights_are_refused(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    for name in WEIGHTED:  # the .bin files of an older download
        for f in (tmp_path / "m" / name).glob("*.safetensors"):
            f.unlink()
        getattr(model, name).save_pretrained(tmp_path / "m" / name, safe_serialization=False)
    assert list((tmp_path / "m" / "unet").glob("*.bin"))
    with pytest.raises(ModelLoadError, match=r"only reads safetensors weights \(a pickle file.*this model has none.*"
                                             r"from_pretrained\(NAME, use_safetensors=False\)\.save_pretrained"):
        StableDiffusion.from_pretrained(tmp_path / "m")


def test_tokenize_pads_to_77_and_rejects_long_prompts(model):
    ids = model.tokenize("a cat and a dog")
    assert ids.shape == (1, 77) and ids[0, :7].tolist() == [49406, 320, 2368, 537, 320, 1929, 49407]
    assert set(ids[0, 7:].tolist()) == {49407}
    with pytest.raises(PromptError, match="tokens long"):
        model.tokenize("cat " * 80)


def test_substituted_token_vectors(model):
    ids = model.tokenize("a cat and a dog")
    plain = model.encode_tokens(ids)
    same = model.encode_tokens(ids, model.token_embedding(ids[0, [2]]), [2])
    torch.testing.assert_close(same, plain)
    vectors = torch.randn(1, 32, requires_grad=True)
    changed = model.encode_tokens(ids, vectors, [2])
    torch.testing.assert_close(changed[:, :2], plain[:, :2])  # causal: earlier tokens unchanged
    assert not torch.allclose(changed[:, 2:], plain[:, 2:])
    changed.sum().backward()
    assert vectors.grad is not None
    assert model.text_encoder.get_input_embeddings().weight.grad is None


def test_token_vectors_per_row_encode_as_one_row_each(model):
    """(B, K, D_in) vectors, one set per row (an inversion's steps in one batch), give each row the
    states its own vectors give alone: the same arithmetic per row, so float32's defaults hold (the
    batch may only change how a matmul is blocked)."""
    ids = model.tokenize("a cat and a dog")
    vectors = torch.randn(5, 2, 32, generator=torch.Generator().manual_seed(0))
    batched = model.encode_tokens(ids.expand(5, -1), vectors, [2, 5])
    one_by_one = torch.cat([model.encode_tokens(ids, v, [2, 5]) for v in vectors])
    torch.testing.assert_close(batched, one_by_one)
    with pytest.raises(ValueError, match="2 token vectors for 1 positions"):
        model.encode_tokens(ids.expand(5, -1), vectors, [2])


def _broken_compiled_call(*args, **kwargs):
    raise RuntimeError("simulated CUDA-graph replay failure\nwith a second line")


@pytest.mark.parametrize("hooked", [False, True])
def test_a_failing_compiled_forward_falls_back_to_eager(hooked, caplog):
    """A compiled UNet call that raises (a compiler or CUDA-graph failure) is answered by the eager
    forward, the model stays eager from then on, and a warning says so: no work is lost."""
    model = tiny_model(seed=0)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    states = model.encode_prompt("a cat and a dog")
    layers = select_layers(attention_layers(model.unet), kinds=["cross"], resolutions=[16])
    stores = []
    for broken in (False, True):
        if broken:  # what compile() sets, with compiled calls that fail
            model.unet._compiled_call_impl = _broken_compiled_call
            model.compiled, model.compiled_backward, model.hooked_forward = "default", True, _broken_compiled_call
        store = AttentionStore()
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="dpl_edit"):
            if hooked:
                with attention_hook(model.unet, layers, store):
                    out = model.predict(z, 501, states)
            else:
                out = model.predict(z, 501, states)
        stores.append((out, store))
    (expected, reference), (out, store) = stores
    assert torch.equal(out, expected)
    if hooked:  # the eager rerun recorded each layer's map once, as an eager forward does
        assert len(store._step[("cross", 16)]) == len(reference._step[("cross", 16)]) == len(layers)
        assert torch.equal(store.step_maps("cross", 16), reference.step_maps("cross", 16))
    assert model.compiled is None and model.hooked_forward is None and not model.compiled_backward
    assert model.unet._compiled_call_impl is None
    assert "runs eager from now on" in caplog.text and "simulated CUDA-graph replay failure" in caplog.text


def test_a_unet_that_does_not_compile_stays_eager(monkeypatch, caplog):
    model = tiny_model(seed=0)
    monkeypatch.setattr(StableDiffusion, "compiled_gradient_error", _broken_compiled_call)
    with caplog.at_level(logging.WARNING, logger="dpl_edit"):
        assert model.compile() is model
    assert model.compiled is None and model.hooked_forward is None and model.unet._compiled_call_impl is None
    assert "runs eager from now on" in caplog.text


def test_compile_leaves_room_for_every_hooked_graph(monkeypatch):
    """Plain, gradient and hooked forwards (recordings, edits) are all graphs of the UNet's forward:
    dynamo's default cap of 8 per code object would send a batch's later variants eager."""
    monkeypatch.setattr(StableDiffusion, "compiled_gradient_error", lambda self: 0.0)
    # (config.patch, not monkeypatch: undoing a monkeypatch of a config module deletes the setting)
    with torch._dynamo.config.patch(recompile_limit=8):
        model = tiny_model(seed=0).compile()
        assert model.compiled == "default" and torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT
