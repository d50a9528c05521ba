"""The papers' map sizes on UNets whose latent side is not Stable Diffusion 1.x's 64: DPL's 16x16
cross- and 32x32 self-attention maps and Prompt-to-Prompt's 16x16 self-attention injection are read
at the same UNet level (SD 2.x at 768 pixels: 24, 48 and 24), and inversion and editing run there
with their defaults."""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image

from dpl_edit import EditConfig, edit, invert, model_dpl_config
from dpl_edit.attention import same_level_resolution
from dpl_edit.editing.plan import P2P_SELF_MAX_RESOLUTION
from dpl_edit.inversion import DynamicPromptConfig
from dpl_edit.models import StableDiffusion, ddim_scheduler
from dpl_edit.random_models import SD_SCHEDULE, clip_text_encoder, seeded
from dpl_edit.tokenizer import clip_tokenizer

SD2_UNET = {"cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True}


@pytest.mark.parametrize(("name", "config", "sizes"), [
    ("SD 1.4", {"sample_size": 64, "cross_attention_dim": 768}, (16, 32, 16)),
    ("SD 2 base (512 px)", {"sample_size": 64, **SD2_UNET}, (16, 32, 16)),
    ("SD 2.1 (768 px)", {"sample_size": 96, **SD2_UNET, "upcast_attention": True}, (24, 48, 24)),
])
def test_the_papers_sizes_at_the_same_level_of_real_unets(name, config, sizes):
    with torch.device("meta"):  # the real shapes, no weights
        unet = UNet2DConditionModel(**config)
    paper = DynamicPromptConfig()
    assert (paper.cross_resolution, paper.self_resolution, P2P_SELF_MAX_RESOLUTION) == (16, 32, 16)
    assert (same_level_resolution(unet, "cross", paper.cross_resolution),
            same_level_resolution(unet, "self", paper.self_resolution),
            same_level_resolution(unet, "self", P2P_SELF_MAX_RESOLUTION)) == sizes


def test_the_tiny_models_keep_the_papers_sizes(model):
    config = model_dpl_config(model)
    assert (config.cross_resolution, config.self_resolution) == (16, 32)


@pytest.fixture(scope="module")
def sd2_shaped():
    """SD 2.x at 768 pixels in miniature: four UNet levels whose sides (24, 12, 6, 3) hold none of
    SD 1.x's map sizes, linear projections in the transformers, attention computed in float32,
    v-prediction, prompts padded with "!" (OpenCLIP's tokenizer); 96-pixel images through a 4x VAE."""
    with seeded(0):
        unet = UNet2DConditionModel(
            sample_size=24, block_out_channels=(32, 32, 64, 64), layers_per_block=1, cross_attention_dim=32,
            attention_head_dim=(2, 2, 4, 4), use_linear_projection=True, upcast_attention=True, norm_num_groups=16,
        )
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                            block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
                            norm_num_groups=8, sample_size=96)
        text_encoder = clip_text_encoder(hidden_size=32, intermediate_size=37, layers=2, heads=4, hidden_act="gelu",
                                         pad_token_id=0)
    tokenizer = clip_tokenizer()
    tokenizer.pad_token = "!"
    scheduler = ddim_scheduler({**SD_SCHEDULE, "prediction_type": "v_prediction"})
    return StableDiffusion(tokenizer, text_encoder, unet, vae, scheduler, "sd2-shaped-random")


def test_inversion_and_editing_run_at_the_same_level_by_default(sd2_shaped):
    config = model_dpl_config(sd2_shaped, max_iterations=2)
    assert (config.cross_resolution, config.self_resolution) == (6, 12)  # 16 and 32 at 24/64 of SD 1.x's side
    image = Image.new("RGB", (96, 96), (150, 60, 40))
    for method in ("nti", "dpl"):
        inversion = invert(sd2_shaped, image, "a red {cat} and a {dog}", method=method, num_steps=5, dpl=config,
                           progress=False)
        assert inversion.settings["cross_resolution"] == 6 and inversion.token_ids[-1] == 0  # padded with "!"
        assert inversion.cross_maps.shape[-2:] == (6, 6)
    # Prompt-to-Prompt's self-attention injection in the layers of 6x6 maps and below, as if chosen
    edited = edit(sd2_shaped, inversion, "a red cat and a {fox}", progress=False)
    chosen = edit(sd2_shaped, inversion, "a red cat and a {fox}", EditConfig(self_max_resolution=6), progress=False)
    mid_only = edit(sd2_shaped, inversion, "a red cat and a {fox}", EditConfig(self_max_resolution=3), progress=False)
    assert torch.equal(edited.latents, chosen.latents)
    assert not torch.equal(edited.latents, mid_only.latents)


def test_sizes_the_model_lacks_are_named_with_the_ways_to_choose(sd2_shaped):
    image = Image.new("RGB", (96, 96), (150, 60, 40))
    with pytest.raises(Exception, match=r"no cross-attention layers with 16x16 maps \(it has 24, 12, 6, 3\).*"
                                         r"--cross-res.*model_dpl_config"):
        invert(sd2_shaped, image, "a {cat}", method="dpl", num_steps=2, dpl=DynamicPromptConfig(), progress=False)
