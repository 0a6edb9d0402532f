"""Text inputs beyond a plain prompt: `prompt_embeds` / `negative_prompt_embeds`, `clip_skip`
and `prompt_syntax="a1111"` (AUTOMATIC1111's emphasis and chunking), against diffusers on
the tiny fixtures (10 steps, fp32 CPU, 'np' images within IMAGE_TOL).

The references are built here, never from minisd's numbers:

* embeddings come from transformers' CLIPTextModel (the one diffusers loaded), fed to
  diffusers' StableDiffusionPipeline;
* a1111 contexts come from `a1111_context` below: each chunk of
  `minisd.prompt_syntax.chunk_prompt` (ids, weights) through transformers' encoder,
  weighted per token and mean-restored (A1111's "Original" emphasis);
* contexts of different lengths (a 2-chunk prompt with a 1-chunk negative), which diffusers'
  pipeline refuses, go through `denoise_separately`: a hand-written loop over diffusers' own
  UNet, DPMSolverMultistepScheduler and VAE with separate conditional and unconditional passes.
"""
import logging
import types

import diffusers
import numpy as np
import pytest
import torch

from minisd.errors import InputError
from minisd.pipeline import Pipeline

IMAGE_TOL = 2e-3  # max |minisd - reference| over 'np' images in [0, 1], as in test_pipeline.py
STEPS = 10
SEED = 7
LONG_PROMPT = "a very detailed painting of a lighthouse on a cliff at sunset, " * 8  # 2 chunks
LONG_NEGATIVE = "blurry, low quality, jpeg artifacts, watermark, text, cropped, " * 8  # 2 chunks
WEIGHTED_PROMPT = "a (red:1.3) cube, [blue] sky"


# ------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------

def load_reference(folder) -> diffusers.StableDiffusionPipeline:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if not hasattr(pipe.text_encoder, "text_model"):
        # diffusers' clip_skip reads text_encoder.text_model.final_layer_norm; transformers 5's
        # CLIPTextModel holds final_layer_norm itself (no text_model wrapper). Give diffusers the
        # path it expects, outside nn.Module's registry so state_dict() is unchanged.
        shim = types.SimpleNamespace(final_layer_norm=pipe.text_encoder.final_layer_norm)
        object.__setattr__(pipe.text_encoder, "text_model", shim)
    return pipe


@pytest.fixture(scope="module")
def reference(tiny_current):
    return load_reference(tiny_current)


@pytest.fixture(scope="module", params=["current", "legacy"])
def ours(request, make_tiny):
    """minisd on each fixture format (the same weights as `reference`)."""
    return Pipeline.from_pretrained(make_tiny(request.param), safety_checker=None)


@pytest.fixture(scope="module")
def ours_current(tiny_current):
    return Pipeline.from_pretrained(tiny_current, safety_checker=None)


@pytest.fixture(scope="module")
def three_layers(make_tiny):
    """(minisd, diffusers) on a tiny pipeline whose text encoder has 3 layers, so clip_skip=2
    is allowed (the default fixture's encoder has 2: clip_skip 0 or 1)."""
    folder = make_tiny("current", text_encoder={"num_hidden_layers": 3})
    return Pipeline.from_pretrained(folder, safety_checker=None), load_reference(folder)


# ------------------------------------------------------------------------------------------
# Reference helpers (transformers / diffusers only)
# ------------------------------------------------------------------------------------------

def gen(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


@torch.no_grad()
def clip_embeds(reference, prompts: str | list[str], clip_skip: int | None = None) -> torch.Tensor:
    """[B, 77, D] from transformers' CLIPTextModel, as diffusers' encode_prompt computes it."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    ids = reference.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    return encode_ids(reference.text_encoder, ids, clip_skip)


def encode_ids(text_encoder, ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    out = text_encoder(ids, output_hidden_states=True)
    if not clip_skip:
        return out.last_hidden_state
    # diffusers' meaning: the hidden state clip_skip layers before the last, then the final norm
    return text_encoder.text_model.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


def chunks_of(text: str, ours: Pipeline) -> list[tuple[list[int], list[float]]]:
    from minisd.prompt_syntax import chunk_prompt
    return [(list(c.ids), list(c.weights)) for c in chunk_prompt(text, ours.tokenizer)]


@torch.no_grad()
def a1111_context(reference, ours: Pipeline, prompts: str | list[str],
                  clip_skip: int | None = None) -> torch.Tensor:
    """AUTOMATIC1111's conditioning, [B, 77 * chunks, D]: each chunk encoded on its own, its
    hidden states multiplied per token by the weights, then rescaled so that the chunk's mean
    is what it was before weighting. Prompts with fewer chunks are padded with empty chunks."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    tok = reference.tokenizer
    empty = ([tok.bos_token_id] + [tok.eos_token_id] * 76, [1.0] * 77)
    per_prompt = [chunks_of(p, ours) for p in prompts]
    count = max(1, *(len(c) for c in per_prompt))
    rows = []
    for chunks in per_prompt:
        parts = []
        for ids, weights in chunks + [empty] * (count - len(chunks)):
            assert len(ids) == len(weights) == 77
            z = encode_ids(reference.text_encoder, torch.tensor([ids]), clip_skip)[0]  # [77, D]
            before = z.mean()
            z = z * torch.tensor(weights, dtype=z.dtype)[:, None]
            parts.append(z * (before / z.mean()))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


@torch.no_grad()
def run_reference(reference, **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": STEPS, "output_type": "np", "generator": gen(), **kwargs}
    return reference(**kwargs).images


def run_ours(ours, **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": STEPS, "output_type": "np", "generator": gen(), **kwargs}
    return ours(**kwargs).images


@torch.no_grad()
def denoise_separately(reference, folder, cond: torch.Tensor, uncond: torch.Tensor,
                       guidance_scale: float = 7.5, steps: int = STEPS, seed: int = SEED) -> np.ndarray:
    """diffusers' txt2img loop by hand, with the conditional and unconditional UNet passes run
    separately so that their contexts may differ in length. One image (batch 1)."""
    assert cond.shape[0] == uncond.shape[0] == 1
    scheduler = diffusers.DPMSolverMultistepScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(steps)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))  # as randn_tensor on CPU
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        noise_cond = reference.unet(x, t, encoder_hidden_states=cond).sample
        noise_uncond = reference.unet(x, t, encoder_hidden_states=uncond).sample
        noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
    image = reference.vae.decode(latents / reference.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------
# prompt_embeds / negative_prompt_embeds
# ------------------------------------------------------------------------------------------

EMBED_CASES = {
    # name: (prompt texts -> prompt_embeds, negative texts -> negative_prompt_embeds or None, extra kwargs)
    "embeds, empty negative": ("a red cube", None, {}),
    "embeds and negative embeds": (["a red cube", "a blue sphere on grass"], ["blurry", "low quality, text"], {}),
    "embeds and negative text": ("a cat", None, {"negative_prompt": "blurry"}),
    "two images per prompt": ("a cat", "ugly", {"num_images_per_prompt": 2}),
    "no guidance": ("a dog", None, {"guidance_scale": 1.0}),
}


@pytest.mark.parametrize("case", list(EMBED_CASES))
def test_prompt_embeds_parity(ours, reference, case):
    texts, negatives, extra = EMBED_CASES[case]
    kwargs = dict(extra, prompt_embeds=clip_embeds(reference, texts))
    if negatives is not None:
        kwargs["negative_prompt_embeds"] = clip_embeds(reference, negatives)
    expected = run_reference(reference, **kwargs)
    assert expected.std() > 1e-3  # not a blank image
    assert max_diff(run_ours(ours, **kwargs), expected) <= IMAGE_TOL


def test_prompt_embeds_equal_the_prompt_they_encode(ours_current, reference):
    text = run_ours(ours_current, prompt="a house by a lake", negative_prompt="fog")
    embeds = run_ours(ours_current, prompt_embeds=clip_embeds(reference, "a house by a lake"),
                      negative_prompt_embeds=clip_embeds(reference, "fog"))
    assert max_diff(embeds, text) <= 1e-4


def test_prompt_embeds_are_not_modified(ours_current, reference):
    embeds, negative = clip_embeds(reference, "a cat"), clip_embeds(reference, "ugly")
    before = embeds.clone(), negative.clone()
    run_ours(ours_current, prompt_embeds=embeds, negative_prompt_embeds=negative, num_images_per_prompt=2,
             num_inference_steps=1, output_type="latent")
    assert torch.equal(embeds, before[0]) and torch.equal(negative, before[1])


@pytest.mark.parametrize("prompt_tokens, negative_tokens", [(154, 77), (77, 154)])
def test_prompt_and_negative_embeds_of_different_lengths(ours_current, reference, tiny_current,
                                                         prompt_tokens, negative_tokens):
    """minisd, unlike diffusers, takes contexts of different lengths T: separate UNet passes."""
    def embeds(texts, tokens):
        return torch.cat([clip_embeds(reference, t) for t in texts[: tokens // 77]], dim=1)
    cond = embeds(["a lighthouse", "on a cliff at sunset"], prompt_tokens)
    uncond = embeds(["blurry", "low quality"], negative_tokens)
    expected = denoise_separately(reference, tiny_current, cond, uncond)
    got = run_ours(ours_current, prompt_embeds=cond, negative_prompt_embeds=uncond)
    assert expected.std() > 1e-3
    assert max_diff(got, expected) <= IMAGE_TOL


def test_hand_written_reference_loop_matches_diffusers(reference, tiny_current):
    """The test's own loop (denoise_separately) is diffusers' pipeline when the lengths agree."""
    cond, uncond = clip_embeds(reference, "a red cube"), clip_embeds(reference, "blurry")
    expected = run_reference(reference, prompt_embeds=cond, negative_prompt_embeds=uncond)
    assert max_diff(denoise_separately(reference, tiny_current, cond, uncond), expected) <= 1e-4


# ------------------------------------------------------------------------------------------
# clip_skip
# ------------------------------------------------------------------------------------------

def test_fixture_text_encoder_depths(tiny_current, make_tiny):
    import json
    config = json.loads((tiny_current / "text_encoder" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2  # so clip_skip 1 is the largest the default fixture allows
    deeper = make_tiny("current", text_encoder={"num_hidden_layers": 3})
    assert json.loads((deeper / "text_encoder" / "config.json").read_text())["num_hidden_layers"] == 3


def test_clip_skip_1_parity(ours, reference):
    """Without guidance only the prompt is encoded: unambiguous parity with diffusers."""
    kwargs = dict(prompt="a red cube on a table", guidance_scale=1.0, clip_skip=1)
    expected = run_reference(reference, **kwargs)
    assert max_diff(expected, run_reference(reference, **dict(kwargs, clip_skip=None))) > 1e-3  # it matters
    assert max_diff(run_ours(ours, **kwargs), expected) <= IMAGE_TOL


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_parity_three_layer_encoder(three_layers, clip_skip):
    ours, reference = three_layers
    kwargs = dict(prompt=["a red cube", "a green field"], guidance_scale=1.0, clip_skip=clip_skip)
    expected = run_reference(reference, **kwargs, generator=[gen(1), gen(2)])
    assert max_diff(run_ours(ours, **kwargs, generator=[gen(1), gen(2)]), expected) <= IMAGE_TOL


@pytest.mark.parametrize("encoder_layers, clip_skip", [(2, 1), (3, 1), (3, 2)])
def test_clip_skip_with_guidance_as_diffusers(reference, ours_current, three_layers, encoder_layers, clip_skip):
    """With guidance, diffusers' `clip_skip=` applies to the prompt only: its negative prompt
    (text, or "" when none) is encoded from the last layer. minisd's plain mode should match.
    (A1111 skips for both; that is what a1111 mode's reference below does.)"""
    ours, ref = (ours_current, reference) if encoder_layers == 2 else three_layers
    kwargs = dict(prompt="a red cube on a table", negative_prompt="blurry", clip_skip=clip_skip)
    expected = run_reference(ref, **kwargs)
    got = run_ours(ours, **kwargs)
    both_skipped = run_reference(ref, prompt_embeds=clip_embeds(ref, kwargs["prompt"], clip_skip),
                                 negative_prompt_embeds=clip_embeds(ref, "blurry", clip_skip))
    off, off_both = max_diff(got, expected), max_diff(got, both_skipped)
    assert off <= IMAGE_TOL, f"off diffusers by {off:.3g}; off 'negative clip-skipped too' by {off_both:.3g}"


def test_clip_skip_with_prompt_embeds_from_skipped_layer(ours_current, reference):
    """clip_skip=1 on text equals feeding the clip-skipped embeddings at guidance 1."""
    embeds = clip_embeds(reference, "a red cube", clip_skip=1)
    got = run_ours(ours_current, prompt="a red cube", clip_skip=1, guidance_scale=1.0)
    assert max_diff(got, run_reference(reference, prompt_embeds=embeds, guidance_scale=1.0)) <= IMAGE_TOL


def test_clip_skip_zero_is_none(ours_current):
    kwargs = dict(prompt="a red cube", negative_prompt="blurry")
    assert max_diff(run_ours(ours_current, **kwargs, clip_skip=0), run_ours(ours_current, **kwargs)) == 0


# ------------------------------------------------------------------------------------------
# prompt_syntax="a1111"
# ------------------------------------------------------------------------------------------

def test_chunks_of_the_weighted_prompt(ours_current, reference):
    """The reference's inputs: chunk_prompt's ids are CLIP's tokens of the text without the
    brackets, each weighted by its fragment ((x:1.3) -> 1.3, [x] -> 1/1.1)."""
    [(ids, weights)] = chunks_of(WEIGHTED_PROMPT, ours_current)
    tok = reference.tokenizer
    expected_ids = tok("a red cube, blue sky", padding="max_length", max_length=77).input_ids
    assert ids == expected_ids
    words = [tok.convert_ids_to_tokens(i) for i in ids]
    by_word = {w: weights[i] for i, w in enumerate(words[:8])}
    assert by_word["red</w>"] == pytest.approx(1.3)
    assert by_word["blue</w>"] == pytest.approx(1 / 1.1)
    assert by_word["cube</w>"] == by_word["a</w>"] == by_word["sky</w>"] == pytest.approx(1.0)
    assert weights[0] == 1.0 and all(w == 1.0 for w in weights[8:])  # bos, eos and padding


def test_long_prompts_are_two_chunks(ours_current):
    assert len(chunks_of(LONG_PROMPT, ours_current)) == 2
    assert len(chunks_of(LONG_NEGATIVE, ours_current)) == 2
    assert len(chunks_of("ugly", ours_current)) == 1


A1111_CASES = {
    "weighted prompt": dict(prompt=WEIGHTED_PROMPT, negative_prompt="blurry, (ugly:1.2)"),
    "weighted prompt, empty negative": dict(prompt=WEIGHTED_PROMPT),
    "weighted prompt, clip_skip 1": dict(prompt=WEIGHTED_PROMPT, negative_prompt="[dark]", clip_skip=1),
    "two chunks and a two-chunk negative": dict(prompt=LONG_PROMPT, negative_prompt=LONG_NEGATIVE),
    "a batch padded with empty chunks": dict(prompt=[LONG_PROMPT, "a (small:1.2) boat"],
                                             negative_prompt=["ugly", LONG_NEGATIVE]),
    "two images per prompt": dict(prompt=WEIGHTED_PROMPT, negative_prompt="[ugly]", num_images_per_prompt=2),
}


@pytest.mark.parametrize("case", list(A1111_CASES))
def test_a1111_parity(ours, reference, case):
    """minisd's a1111 images == diffusers fed the A1111 contexts built by a1111_context."""
    kwargs = A1111_CASES[case]
    prompts = kwargs["prompt"]
    n = 1 if isinstance(prompts, str) else len(prompts)
    negatives = kwargs.get("negative_prompt", [""] * n)
    clip_skip = kwargs.get("clip_skip")
    cond = a1111_context(reference, ours, prompts, clip_skip)
    uncond = a1111_context(reference, ours, negatives, clip_skip)
    assert cond.shape == uncond.shape  # diffusers takes equal shapes only
    generator = [gen(1), gen(2)] if n == 2 else gen()
    per_prompt = kwargs.get("num_images_per_prompt", 1)
    expected = run_reference(reference, prompt_embeds=cond, negative_prompt_embeds=uncond, generator=generator,
                             num_images_per_prompt=per_prompt)
    generator = [gen(1), gen(2)] if n == 2 else gen()
    got = run_ours(ours, **kwargs, prompt_syntax="a1111", generator=generator)
    assert expected.std() > 1e-3
    assert max_diff(got, expected) <= IMAGE_TOL


def test_a1111_weights_change_the_image(ours_current):
    weighted = run_ours(ours_current, prompt=WEIGHTED_PROMPT, prompt_syntax="a1111")
    unweighted = run_ours(ours_current, prompt="a red cube, blue sky", prompt_syntax="a1111")
    assert max_diff(weighted, unweighted) > 1e-3


def test_a1111_prompt_with_fewer_chunks_than_negative(ours_current, reference, tiny_current):
    """A 1-chunk prompt with a 2-chunk negative: separate passes, the negative not cut."""
    cond = a1111_context(reference, ours_current, "a (red:1.2) lighthouse")
    uncond = a1111_context(reference, ours_current, LONG_NEGATIVE)
    assert (cond.shape[1], uncond.shape[1]) == (77, 154)
    expected = denoise_separately(reference, tiny_current, cond, uncond)
    got = run_ours(ours_current, prompt="a (red:1.2) lighthouse", negative_prompt=LONG_NEGATIVE,
                   prompt_syntax="a1111")
    assert max_diff(got, expected) <= IMAGE_TOL


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_a1111_different_chunk_counts(ours_current, reference, tiny_current, clip_skip):
    """A 2-chunk prompt with a 1-chunk negative: not padded; cond and uncond passes run
    separately, checked against diffusers' own components in a hand-written loop."""
    cond = a1111_context(reference, ours_current, LONG_PROMPT, clip_skip)
    uncond = a1111_context(reference, ours_current, "ugly, (blurry:1.4)", clip_skip)
    assert (cond.shape[1], uncond.shape[1]) == (154, 77)
    expected = denoise_separately(reference, tiny_current, cond, uncond)
    got = run_ours(ours_current, prompt=LONG_PROMPT, negative_prompt="ugly, (blurry:1.4)", clip_skip=clip_skip,
                   prompt_syntax="a1111")
    assert expected.std() > 1e-3
    assert max_diff(got, expected) <= IMAGE_TOL


@pytest.mark.parametrize("prompt, negative", [
    ("a red cube", None),
    ("a photo of an astronaut riding a horse", "blurry, low quality"),
    (["a house", "a tree by the river"], ["fog", ""]),
])
def test_a1111_equals_plain_for_short_unweighted_prompts(ours, prompt, negative):
    n = 1 if isinstance(prompt, str) else len(prompt)
    kwargs = dict(prompt=prompt, negative_prompt=negative)
    plain = run_ours(ours, **kwargs, generator=[gen(i) for i in range(n)])
    a1111 = run_ours(ours, **kwargs, prompt_syntax="a1111", generator=[gen(i) for i in range(n)])
    assert max_diff(a1111, plain) <= 1e-5


def test_a1111_reference_restores_each_chunk_mean(ours_current, reference):
    """The emphasis keeps each chunk's mean: the weighted context's chunk means equal the
    unweighted one's (same tokens), while the values differ."""
    weighted = a1111_context(reference, ours_current, ["a (red:1.3) cube, [blue] sky", "(" + LONG_PROMPT + ":1.2)"])
    plain = a1111_context(reference, ours_current, ["a red cube, blue sky", LONG_PROMPT])
    assert not torch.allclose(weighted, plain)
    for w, p in zip(weighted.split(77, dim=1), plain.split(77, dim=1)):
        torch.testing.assert_close(w.mean(dim=(1, 2)), p.mean(dim=(1, 2)), rtol=1e-5, atol=1e-6)


def test_a1111_encode_prompt_restores_each_chunk_mean(ours_current, reference):
    """minisd's own context (through encode_prompt, when it takes prompt_syntax) equals the
    reference, so its chunk means are restored too."""
    import inspect
    if "prompt_syntax" not in inspect.signature(ours_current.encode_prompt).parameters:
        pytest.skip("Pipeline.encode_prompt does not take prompt_syntax; covered by the image parity tests")
    prompts = [WEIGHTED_PROMPT, LONG_PROMPT]
    got = ours_current.encode_prompt(prompts, prompt_syntax="a1111")
    torch.testing.assert_close(got.float(), a1111_context(reference, ours_current, prompts), rtol=1e-4, atol=1e-5)


def test_a1111_long_prompt_is_not_truncated_nor_warned(ours_current, caplog):
    run = dict(prompt=LONG_PROMPT, negative_prompt=LONG_NEGATIVE, num_inference_steps=1, output_type="latent")
    with caplog.at_level(logging.WARNING, logger="minisd"):
        ours_current(**run, prompt_syntax="a1111")
    assert "truncated" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="minisd"):
        ours_current(**run, prompt_syntax="plain")
    assert "truncated" in caplog.text


def test_a1111_long_prompt_differs_from_its_cut(ours_current):
    """The second chunk reaches the UNet: a long prompt is not its first 75 tokens."""
    full = run_ours(ours_current, prompt=LONG_PROMPT, prompt_syntax="a1111")
    cut = run_ours(ours_current, prompt=LONG_PROMPT, prompt_syntax="plain")
    assert max_diff(full, cut) > 1e-3


# ------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------

D = 32  # the tiny UNet's cross_attention_dim
GOOD = torch.zeros(1, 77, D)
NOT_NEGATIVE = r"(?<!negative_)prompt_embeds"  # names prompt_embeds, not only negative_prompt_embeds


def nan_embeds() -> torch.Tensor:
    bad = torch.zeros(1, 77, D)
    bad[0, 3, 5] = float("nan")
    return bad


BAD_EMBEDS = {
    "wrong D": torch.zeros(1, 77, 16),
    "2-d": torch.zeros(77, D),
    "4-d": torch.zeros(1, 1, 77, D),
    "a list": [[[0.0] * D] * 77],
    "a numpy array": np.zeros((1, 77, D), dtype=np.float32),
    "NaN": nan_embeds(),
    "infinity": torch.full((1, 77, D), float("inf")),
    "integer dtype": torch.zeros(1, 77, D, dtype=torch.int64),
    "bool dtype": torch.zeros(1, 77, D, dtype=torch.bool),
}

BAD_CASES = {
    **{f"prompt_embeds {name}": (dict(prompt=None, prompt_embeds=bad), NOT_NEGATIVE)
       for name, bad in BAD_EMBEDS.items()},
    **{f"negative_prompt_embeds {name}": (dict(prompt_embeds=GOOD, negative_prompt_embeds=bad), "negative_prompt_embeds")
       for name, bad in BAD_EMBEDS.items()},
    "prompt and prompt_embeds": (dict(prompt="a cat", prompt_embeds=GOOD), NOT_NEGATIVE),
    "neither prompt nor prompt_embeds": (dict(prompt=None), "prompt"),
    "negative_prompt and negative_prompt_embeds": (
        dict(prompt="a cat", negative_prompt="ugly", negative_prompt_embeds=GOOD), "negative_prompt"),
    "negative embeds batch 2 for 1 prompt": (
        dict(prompt_embeds=GOOD, negative_prompt_embeds=torch.zeros(2, 77, D)), "negative_prompt_embeds"),
    "negative embeds batch 1 for 2 prompts": (
        dict(prompt=["a", "b"], negative_prompt_embeds=GOOD), "negative_prompt_embeds"),
    "negative embeds batch 3 for 2 prompt embeds": (
        dict(prompt_embeds=torch.zeros(2, 77, D), negative_prompt_embeds=torch.zeros(3, 77, D)),
        "negative_prompt_embeds"),
    **{f"clip_skip {value!r}": (dict(prompt="a cat", clip_skip=value), "^clip_skip")
       for value in (-1, 1.0, 1.5, True, "1", 3, 12)},  # the tiny encoder has 2 layers: 0 to 2
    **{f"prompt_syntax {value!r}": (dict(prompt="a cat", prompt_syntax=value), "prompt_syntax")
       for value in ("compel", "", "A1111 ", 1)},
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_text_inputs(ours_current, case):
    kwargs, words = BAD_CASES[case]
    with pytest.raises(InputError, match=words):
        ours_current(**{"num_inference_steps": 1, "output_type": "latent", **kwargs})


def test_clip_skip_limit_follows_the_encoder_depth(three_layers):
    ours, _ = three_layers
    ours("a cat", clip_skip=2, num_inference_steps=1, output_type="latent")  # allowed with 3 layers
    # As in diffusers, clip_skip may equal the layer count: the embeddings alone, normalized.
    ours("a cat", clip_skip=3, num_inference_steps=1, output_type="latent")
    with pytest.raises(InputError, match="^clip_skip: must be an integer from 0 to 3"):
        ours("a cat", clip_skip=4, num_inference_steps=1, output_type="latent")


@pytest.mark.parametrize("kwargs", [
    dict(prompt_syntax="plain"),
    dict(prompt_syntax="a1111"),
    dict(clip_skip=None),
    dict(clip_skip=0),
    dict(clip_skip=1),
    dict(prompt=None, prompt_embeds=GOOD, negative_prompt_embeds=GOOD),
    dict(prompt=None, prompt_embeds=GOOD, negative_prompt="ugly"),
    dict(prompt=None, prompt_embeds=GOOD.double()),  # a float tensor of another float dtype
])
def test_good_text_inputs_run(ours_current, kwargs):
    out = ours_current(**{"prompt": "a cat", "num_inference_steps": 1, "output_type": "latent", **kwargs})
    assert out.images.shape == (1, 4, 8, 8)
