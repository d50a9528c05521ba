import torch

from dpl_edit import NullTextConfig, invert, reconstruct_latents
from dpl_edit.attention import attention_layers, select_layers
from dpl_edit.diffusion import DDIMSchedule
from dpl_edit.images import to_pil
from dpl_edit.inversion import ddim_inversion


def test_ddim_inversion_trajectory_and_maps(model, image):
    schedule = DDIMSchedule.from_scheduler(model.scheduler, 50)
    z0 = model.encode_image(image)
    layers = attention_layers(model.unet)
    record = select_layers(layers, kinds=["cross"], resolutions=[16]) + select_layers(
        layers, kinds=["self"], resolutions=[32]
    )
    result = ddim_inversion(model, z0, model.encode_prompt("a cat"), schedule, record=record, progress=False)
    assert len(result.trajectory) == 51 and torch.equal(result.trajectory[0], z0)
    assert torch.equal(result.pivot[0], result.trajectory[-1])
    assert result.attention.steps == 50
    assert result.attention.average_maps("cross", 16).shape == (1, 16, 16, 77)
    assert result.attention.average_maps("self", 32).shape == (1, 32, 32, 1024)
    assert model.unet.attn_processors.keys() == {l.name for l in layers}


def test_null_text_inversion_beats_ddim_at_guidance_7_5(model, image):
    steps = []
    errors = {}
    for method in ("ddim", "nti"):
        inversion = invert(
            model, to_pil(image), "a cat and a dog", method=method, num_steps=10,
            callback=steps.append, progress=False,
        )
        z0 = reconstruct_latents(model, inversion, progress=False)
        errors[method] = torch.mean((z0 - inversion.source_latent) ** 2).item()
    assert errors["nti"] < 0.5 * errors["ddim"], errors
    assert [s.step for s in steps] == list(range(10))
    assert all(1 <= s.iterations <= 10 and s.loss >= 0 for s in steps)
    assert all(p.grad is None for p in model.unet.parameters())


def test_early_stop_and_authors_preset(model, image):
    loose = NullTextConfig(early_stop_epsilon=1e3)
    steps = []
    inversion = invert(model, to_pil(image), "a cat", method="nti", num_steps=5, null_text=loose,
                       callback=steps.append, progress=False)
    assert [s.iterations for s in steps] == [1] * 5
    assert inversion.null_states.shape == (5, 77, 32)
    authors = NullTextConfig.authors()
    assert (authors.max_iterations, authors.early_stop, authors.reset_each_step) == (51, False, True)
