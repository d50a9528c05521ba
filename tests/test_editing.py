"""Prompt-to-Prompt editing: the pure attention edits, the plan on real CLIP ids, and editing runs."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from dpl_edit import DplEditError, EditConfig, PromptError, edit, invert, reconstruct
from dpl_edit.diffusion import DDIMSchedule
from dpl_edit.editing.attention_edits import blend_mask, edit_cross_attention, local_blend
from dpl_edit.editing.plan import make_plan
from dpl_edit.images import to_pil
from dpl_edit.inversion import DynamicPromptConfig, NullTextConfig
from dpl_edit.prompts import align_tokens, parse_marked_prompt
from dpl_edit.sampling import sample
from dpl_edit.tokenizer import clip_tokenizer

TOKENIZER = clip_tokenizer()


def _prompt(text):
    return parse_marked_prompt(text, TOKENIZER, require_words=False)


def test_replace_and_refine_mappers_on_clip_ids():
    source = _prompt("a {cat} and a {dog}")  # <s> a cat and a dog </s>
    plan = make_plan(source, [_prompt("a leopard and a tiger")], [2, 5], EditConfig(), 50, TOKENIZER)
    assert plan.mapper[0, :8].tolist() == list(range(8)) and plan.mapped.all()
    # refinement: "a fluffy cat and a big dog": new tokens fluffy (2) and big (6) keep their own maps
    assert align_tokens(source, _prompt("a fluffy cat and a big dog"))[:9] == [0, 1, -1, 2, 3, 4, -1, 5, 6]
    plan = make_plan(source, [_prompt("a fluffy cat and a big dog")], [2, 5], EditConfig(mode="refine"), 50, TOKENIZER)
    assert plan.mapped[0, :9].tolist() == [1, 1, 0, 1, 1, 1, 0, 1, 1]
    assert plan.kept_tokens == [([3, 7], [0, 1])]  # cat and dog keep their learned vectors
    with pytest.raises(PromptError, match="refine"):
        make_plan(source, [_prompt("a cat and a rectangle")], [2, 5], EditConfig(), 50, TOKENIZER)


def test_swapped_words_lose_their_learned_vector_and_windows_follow_the_steps():
    source = _prompt("a {cat} and a {dog}")
    config = EditConfig(cross_replace_steps=0.8, word_cross_replace_steps={"tiger": 0.2})
    plan = make_plan(source, [_prompt("a cat and a tiger")], [2, 5], config, 10, TOKENIZER)
    assert plan.kept_tokens == [([2], [0])]
    assert plan.windows[:, 0, 2].tolist() == [1] * 8 + [0] * 2
    assert plan.windows[:, 0, 5].tolist() == [1] * 2 + [0] * 8
    assert plan.self_steps == 4


def test_blend_words_follow_the_source_region_not_a_look_alike_in_the_target():
    tokenizer = clip_tokenizer()
    source = parse_marked_prompt("a purple {rectangle} and a yellow {rectangle} on brick", tokenizer)
    swapped = parse_marked_prompt("a purple oval and a yellow rectangle on brick", tokenizer, require_words=False)
    plan = make_plan(source, [swapped], [3, 4, 8, 9], EditConfig(mode="refine", blend=("rectangle",)), 10, tokenizer)
    assert plan.blend_positions == [[3, 4], [3]]  # "oval" took the first rectangle's place; the second stays out
    source = parse_marked_prompt("a red {circle} and a blue {square}", tokenizer)
    swapped = parse_marked_prompt("a red square and a blue square", tokenizer, require_words=False)
    plan = make_plan(source, [swapped], [3, 7], EditConfig(blend=("circle",)), 10, tokenizer)
    assert plan.blend_positions == [[3], [3]]
    fluffy = parse_marked_prompt("a red fluffy circle and a blue square", tokenizer, require_words=False)
    plan = make_plan(source, [fluffy], [3, 7], EditConfig(mode="refine", blend=("circle", "fluffy")), 10, tokenizer)
    assert plan.blend_positions == [[3], [3, 4]]


def test_cross_attention_edit_and_reweighting():
    base, target = torch.rand(2, 4, 77), torch.rand(1, 2, 4, 77)
    mapper = torch.arange(77)[None]
    mapped, window = torch.ones(1, 77), torch.ones(1, 77)
    torch.testing.assert_close(edit_cross_attention(base, target, mapper, mapped, window), base[None])
    off = edit_cross_attention(base, target, mapper, mapped, torch.zeros(1, 77))
    torch.testing.assert_close(off, target)
    equalizer = torch.ones(1, 77)
    equalizer[0, 5] = 2.0
    weighted = edit_cross_attention(base, target, mapper, mapped, window, equalizer)
    torch.testing.assert_close(weighted[..., 5], 2 * base[None, ..., 5])
    others = [k for k in range(77) if k != 5]
    torch.testing.assert_close(weighted[..., others], base[None][..., others])
    new = torch.zeros(1, 77)  # a new token keeps its own column
    mixed = edit_cross_attention(base, target, mapper, new, window)
    torch.testing.assert_close(mixed, target)


def test_local_blend_keeps_the_source_outside_the_mask():
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, 0] = maps[1, 3, 3] = 1.0
    mask = blend_mask(maps, 8)
    assert mask.shape == (2, 1, 8, 8)
    assert mask[0, 0, 0, 0] == 1 and mask[0, 0, 7, 7] == 1 and mask[0, 0, 0, 7] == 0  # source | target 1
    latents = torch.randn(3, 4, 8, 8)
    blended = local_blend(latents, mask)
    outside = (mask == 0).expand(-1, 4, -1, -1)
    assert torch.equal(blended[1:][outside], latents[:1].expand(2, -1, -1, -1)[outside])
    torch.testing.assert_close(blended[1:][~outside], latents[1:][~outside])


@pytest.fixture(scope="module")
def inversions(model):
    g = torch.Generator().manual_seed(5)
    image = to_pil(torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g) * 2 - 1, size=128))
    fast_dpl, fast_nti = DynamicPromptConfig(max_iterations=2), NullTextConfig(max_iterations=3)  # (editing is tested)
    return {
        method: invert(model, image, "a {cat} and a {dog}", method=method, num_steps=5, dpl=fast_dpl,
                       null_text=fast_nti, progress=False)
        for method in ("nti", "dpl", "npi")
    }


@pytest.mark.parametrize("method", ["nti", "dpl", "npi"])
def test_target_equal_to_source_reproduces_the_reconstruction(model, inversions, method):
    """The reconstruction samples the source; an edit's source follows its trajectory (NTI, DPL) or
    steps unguided (negative-prompt inversion): the same up to rounding."""
    inversion = inversions[method]
    reconstruction = np.asarray(reconstruct(model, inversion, progress=False), dtype=float)
    result = edit(model, inversion, ["a cat and a dog"], progress=False)
    assert np.abs(np.asarray(result.reconstruction, dtype=float) - reconstruction).max() <= 2
    assert np.abs(np.asarray(result.edits[0], dtype=float) - reconstruction).max() <= 2


@pytest.mark.parametrize("method", ["nti", "dpl"])
def test_the_source_branch_follows_the_trajectory_sampling_computes_again(model, inversions, one_at_a_time, method):
    """An edit's source branch follows the inversion's trajectory (and its unconditional row is not
    run) because sampling it computes that trajectory again: bit for bit where the arithmetic is the
    same, i.e. with the UNet called one image at a time (a row's rounding then does not depend on its
    batch), every layer's attention an explicit softmax (DPL's recorded forwards compute so; the
    fused kernel rounds otherwise) and each step's text states encoded alone. A target row beside it is the same either way, in a batch of 3
    rows a step instead of 4."""
    processors = model.unet.attn_processors
    model.unet.set_attn_processor(AttnProcessor())
    try:
        inversion = invert(model, inversions["nti"].source_image, "a {cat} and a {dog}", method=method,
                           num_steps=4, dpl=DynamicPromptConfig(max_iterations=2),
                           null_text=NullTextConfig(max_iterations=2), progress=False)
        schedule = DDIMSchedule.from_scheduler(model.scheduler, inversion.num_steps)
        target = model.encode_prompt("a cat and a tiger")
        ids = torch.tensor([inversion.token_ids])
        with torch.no_grad():  # each step's states encoded alone, as the inversion encoded them
            sources = ([model.encode_tokens(ids)] * inversion.num_steps if inversion.token_vectors is None else
                       [model.encode_tokens(ids, v, inversion.token_positions) for v in inversion.token_vectors])
        states = [torch.cat([source, target]) for source in sources]
        z_T = inversion.latent_T.expand(2, -1, -1, -1)
        args = (model, z_T, schedule, states, inversion.null_at(model), inversion.guidance_scale)
        seen = []
        sampled = sample(*args, step_end=lambda i, z: seen.append(z[0].clone()), progress=False)
        one_at_a_time.clear()
        followed = sample(*args, source_trajectory=inversion.trajectory, progress=False)
    finally:
        model.unet.set_attn_processor(processors)
    assert len(inversion.trajectory) == inversion.num_steps + 1 and torch.equal(inversion.trajectory[0], z_T[0])
    for i, z in enumerate(seen):
        assert torch.equal(z, inversion.trajectory[i + 1]), i
    assert torch.equal(followed, sampled)
    assert one_at_a_time == [3] * inversion.num_steps  # the target's two rows and the source's conditional one


def test_several_targets_blend_and_processors_restored(model, inversions):
    before = {k: type(v) for k, v in model.unet.attn_processors.items()}
    config = EditConfig(blend=("cat",), reweight={"tiger": 2.0}, blend_threshold=0.97)
    result = edit(model, inversions["dpl"], ["a tiger and a dog", "a cat and a {tiger}"], config, progress=False)
    assert len(result.edits) == 2 and result.latents.shape[0] == 3
    assert {k: type(v) for k, v in model.unet.attn_processors.items()} == before
    outside = (result.blend_masks == 0).expand(-1, 4, -1, -1)
    source = result.latents[:1].expand(2, -1, -1, -1)
    assert outside.any()
    assert torch.equal(result.latents[1:][outside], source[outside])
    with pytest.raises(PromptError, match="refine"):
        edit(model, inversions["dpl"], ["a leopard cub and a dog"], progress=False)


def test_the_callback_sees_every_step_and_can_stop_the_edit_or_reconstruction(model, inversions):
    inversion, config = inversions["dpl"], EditConfig(blend=("cat",), blend_threshold=0.97)
    plain = edit(model, inversion, ["a tiger and a dog"], config, progress=False)
    steps = []
    seen = edit(model, inversion, ["a tiger and a dog"], config, callback=steps.append, progress=False)
    assert steps == list(range(inversion.num_steps))
    assert torch.equal(seen.latents, plain.latents)  # local blend still replaces the sampled latents
    steps.clear()
    assert reconstruct(model, inversion, callback=steps.append, progress=False) == reconstruct(
        model, inversion, progress=False)
    assert steps == list(range(inversion.num_steps))

    class Stop(Exception):
        pass

    def stop_at_2(step: int) -> None:
        if step == 2:
            raise Stop

    before = {k: type(v) for k, v in model.unet.attn_processors.items()}
    with pytest.raises(Stop):
        edit(model, inversion, ["a tiger and a dog"], config, callback=stop_at_2, progress=False)
    assert {k: type(v) for k, v in model.unet.attn_processors.items()} == before


def test_the_entry_points_take_folders_files_and_one_target_as_a_string(model, inversions, tmp_path):
    """What a user would type: an inversion's folder for the inversion, an image file's path for
    the image, one target prompt without a list; each gives what the explicit objects give."""
    inversion = inversions["nti"]
    inversion.save(tmp_path / "inv")
    as_list = edit(model, inversion, ["a cat and a tiger"], progress=False)
    as_folder = edit(model, tmp_path / "inv", "a cat and a tiger", progress=False)
    assert as_folder.targets == ["a cat and a tiger"] and len(as_folder.edits) == 1
    assert np.array_equal(np.asarray(as_folder.edits[0]), np.asarray(as_list.edits[0]))
    assert np.array_equal(np.asarray(reconstruct(model, str(tmp_path / "inv"), progress=False)),
                          np.asarray(reconstruct(model, inversion, progress=False)))
    inversion.source_image.save(tmp_path / "source.png")
    from_file = invert(model, tmp_path / "source.png", "a cat and a dog", method="ddim", num_steps=2, progress=False)
    from_image = invert(model, inversion.source_image, "a cat and a dog", method="ddim", num_steps=2, progress=False)
    assert torch.equal(from_file.latent_T, from_image.latent_T)
    with pytest.raises(DplEditError, match="Expected an Inversion or the folder of a saved one, got int"):
        reconstruct(model, 5)
    with pytest.raises(DplEditError, match="Expected a PIL image, a numpy picture or an image file's path, got Tensor"):
        invert(model, torch.zeros(1, 3, 128, 128), "a cat", progress=False)


def test_direct_inversion_reconstructs_exactly_and_dpl_combines_with_it(model, inversions):
    image = inversions["nti"].source_image
    for method, null in (("direct", "optimized"), ("dpl", "direct"), ("dpl", "negative")):
        inversion = invert(model, image, "a {cat} and a {dog}", method=method, null=null, num_steps=4,
                           dpl=DynamicPromptConfig(max_iterations=1), progress=False)
        assert inversion.null == ("direct" if method == "direct" else null)
        assert (inversion.token_vectors is not None) == (method == "dpl")
        assert inversion.null_states is None
        from dpl_edit import reconstruct_latents

        steps = []
        z0 = reconstruct_latents(model, inversion, callback=steps.append, progress=False)
        assert steps == list(range(inversion.num_steps))
        if inversion.null == "direct":  # the pivot ends at the source latent: nothing sampled
            assert torch.equal(z0, inversion.source_latent)
        result = edit(model, inversion, ["a cat and a tiger"], progress=False)
        assert len(result.edits) == 1
        assert torch.equal(result.latents[:1], inversion.trajectory[-1:])  # the source followed its trajectory


def test_per_word_settings_apply_to_the_targets_that_have_the_word():
    source = _prompt("a {cat} and a {dog}")
    targets = [_prompt("a cat and a tiger"), _prompt("a cat and a wolf")]
    plan = make_plan(source, targets, [2, 5], EditConfig(reweight={"tiger": 3.0}), 10, TOKENIZER)
    assert plan.equalizer[0, 5] == 3.0 and plan.equalizer[1].eq(1).all()
    with pytest.raises(PromptError, match="none of the target"):
        make_plan(source, targets, [2, 5], EditConfig(reweight={"lion": 3.0}), 10, TOKENIZER)


def test_blend_words_by_occurrence_or_braces():
    source = _prompt("a purple {rectangle} and a yellow {rectangle} on brick")  # rectangle: 3-4 and 8-9
    target = _prompt("a purple rectangle and a blue rectangle on brick")
    for spec in ("rectangle@2", "a purple rectangle and a yellow {rectangle} on brick"):
        plan = make_plan(source, [target], [3, 4, 8, 9], EditConfig(blend=(spec,)), 10, TOKENIZER)
        assert plan.blend_positions == [[8, 9], [8, 9]], spec
    plan = make_plan(source, [target], [3, 4, 8, 9], EditConfig(blend=("rectangle",)), 10, TOKENIZER)
    assert plan.blend_positions == [[3, 4], [3, 4]]  # a plain word is its first occurrence
    for spec, message in (("rectangle@3", "2 occurrence"), ("rectangle@0", "word@N"),
                          ("a purple {rectangle}", "braces"), ("oval@1", "0 occurrence")):
        with pytest.raises(PromptError, match=message):
            make_plan(source, [target], [3, 4, 8, 9], EditConfig(blend=(spec,)), 10, TOKENIZER)
    with pytest.raises(PromptError, match="neither in"):
        make_plan(source, [target], [3, 4, 8, 9], EditConfig(blend=("rectangle",), subtract=("oval",)), 10, TOKENIZER)
    with pytest.raises(PromptError, match="subtract, blend_threshold: settings of local blending, which no blend words turn on"):
        EditConfig(subtract=("oval",), blend_threshold=0.5)


def test_target_tokens_keep_plain_and_auto():
    source = _prompt("a red {circle} and a blue {square}")  # circle 3, square 7
    colour = _prompt("a red circle and a yellow square")  # the square's colour changes
    shape = _prompt("a red oval and a blue square")
    kept = {mode: [make_plan(source, [t], [3, 7], EditConfig(target_tokens=mode), 10, TOKENIZER).kept_tokens[0]
                   for t in (colour, shape)] for mode in ("keep", "plain", "auto")}
    assert kept["keep"] == [([3, 7], [0, 1]), ([7], [1])]
    assert kept["plain"] == [([], []), ([], [])]
    assert kept["auto"] == [([3], [0]), ([7], [1])]  # the square loses its vector; the oval swap changes no attribute
    refined = _prompt("a red circle and a big blue square")  # an inserted attribute counts too
    plan = make_plan(source, [refined], [3, 7], EditConfig(mode="refine", target_tokens="auto"), 10, TOKENIZER)
    assert plan.kept_tokens == [([3], [0])]
    with pytest.raises(PromptError, match="target_tokens"):
        EditConfig(target_tokens="some")


def test_a_model_recommends_its_target_tokens_unless_the_user_chose():
    from dpl_edit.editing import recommended_edit_config
    from dpl_edit.registry import load_model

    plain, scenes = load_model("scenes-plain").settings, load_model("scenes").settings
    assert recommended_edit_config(EditConfig(), plain).target_tokens == "auto"  # chosen on its validation scenes
    assert recommended_edit_config(EditConfig(), scenes).target_tokens == "keep"  # the authors' default
    chosen = EditConfig(target_tokens="plain")
    assert recommended_edit_config(chosen, plain, chosen=["target_tokens"]).target_tokens == "plain"
    assert recommended_edit_config(EditConfig(), {"edit": {"mode": "refine"}}).mode == "replace"  # not recommendable
