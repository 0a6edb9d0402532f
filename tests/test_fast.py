"""The speed levers of minisd/fast.py keep parity, each at its own tolerance: each lever alone
and all together against the textbook path and against diffusers (exact math, fp32 tolerance),
torch.compile (inductor's fused kernels reorder float sums), bfloat16 (PSNR against fp32)."""
import dataclasses

import diffusers
import numpy as np
import pytest
import torch

from minisd import SpeedLevers, load_unet, load_vae
from minisd.fast import (IN_PLACE, CachedCrossAttention, FusedSelfAttention, InPlaceResidualBlock,
                         InPlaceTransformer2D, InPlaceTransformerBlock, InPlaceVAEAttention, apply_levers,
                         text_kv_cached)
from minisd.pipeline import Pipeline
from minisd.unet import Attention, BasicTransformerBlock, ResnetBlock2D, Transformer2DModel
from minisd.vae import VAEAttention

REL_TOL = 1e-5        # a lever against the plain path or diffusers: max |diff| / max |ref|
COMPILED_TOL = 1e-4   # compiled UNet step, fp32: max |diff| / max |ref|
BF16_MIN_PSNR = 30.0  # dB, bfloat16 image against the float32 image, same seed

LEVERS = {
    "none": SpeedLevers.none(),
    "fused_qkv": dataclasses.replace(SpeedLevers.none(), fused_qkv=True),
    "cached_cross_kv": dataclasses.replace(SpeedLevers.none(), cached_cross_kv=True),
    "inplace_residuals": dataclasses.replace(SpeedLevers.none(), inplace_residuals=True),
    "all": SpeedLevers(),
}


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


def layer_kinds(model) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, (Attention, *IN_PLACE))}


@pytest.mark.parametrize("levers", list(LEVERS))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_each_lever_matches_the_plain_path_and_diffusers(tiny_current, levers, channels_last):
    ref = diffusers.UNet2DConditionModel.from_pretrained(tiny_current / "unet").eval()
    plain = load_unet(tiny_current)
    unet = load_unet(tiny_current, channels_last=channels_last)
    apply_levers(LEVERS[levers], unet)
    assert sorted(unet.state_dict()) == sorted(ref.state_dict())  # keys unchanged by the swaps
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 77, 32, generator=g)
    inputs = x.clone(), ctx.clone()
    with torch.no_grad():
        expected, textbook = ref(x, 500, ctx).sample, plain(x, 500, ctx)
        with text_kv_cached(unet, ctx):
            fast = unet(x, 500, ctx)
        assert rel_err(fast, textbook) <= REL_TOL
        assert rel_err(fast, expected) <= REL_TOL
        assert rel_err(unet(x, 500, ctx), expected) <= REL_TOL  # outside the block: plain cross-attention
    assert torch.equal(inputs[0], x) and torch.equal(inputs[1], ctx)  # in-place adds stay inside


@pytest.mark.parametrize("levers", ["none", "inplace_residuals", "all"])
def test_vae_levers_match_the_plain_path_and_diffusers(tiny_current, levers):
    ref = diffusers.AutoencoderKL.from_pretrained(tiny_current / "vae").eval()
    plain, vae = load_vae(tiny_current), load_vae(tiny_current, channels_last=True)
    apply_levers(LEVERS[levers], vae)
    g = torch.Generator().manual_seed(3)
    z, image = torch.randn(1, 4, 8, 12, generator=g), torch.rand(1, 3, 64, 48, generator=g) * 2 - 1
    with torch.no_grad():
        assert rel_err(vae.decode(z), plain.decode(z)) <= REL_TOL
        assert rel_err(vae.decode(z), ref.decode(z).sample) <= REL_TOL
        assert rel_err(vae.encode(image)[0], ref.encode(image).latent_dist.mean) <= REL_TOL


def test_levers_are_applied_by_from_pretrained_and_switch_off(tiny_current):
    fast = Pipeline.from_pretrained(tiny_current, safety_checker=None)
    plain = Pipeline.from_pretrained(tiny_current, safety_checker=None, levers=SpeedLevers.none())
    assert layer_kinds(fast.unet) == {FusedSelfAttention, CachedCrossAttention, InPlaceResidualBlock,
                                      InPlaceTransformer2D, InPlaceTransformerBlock}
    assert layer_kinds(fast.vae) == {InPlaceResidualBlock, InPlaceVAEAttention}
    # the textbook classes, nothing swapped in
    assert layer_kinds(plain.unet) == {Attention, ResnetBlock2D, Transformer2DModel, BasicTransformerBlock}
    assert layer_kinds(plain.vae) == {ResnetBlock2D, VAEAttention}
    run = dict(prompt=["a red cube", "a blue ball"], num_inference_steps=4, output_type="np", height=64, width=48)
    got = fast(**run, generator=torch.Generator().manual_seed(0)).images
    want = plain(**run, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(got - want).max() <= REL_TOL  # images in [0, 1]


def test_cached_kv_refuses_another_context_and_is_cleared(tiny_current):
    unet = load_unet(tiny_current)
    apply_levers(SpeedLevers(), unet)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        with text_kv_cached(unet, ctx):
            with pytest.raises(RuntimeError, match="another text context"):
                unet(x, 1, ctx.clone())
            with pytest.raises(RuntimeError, match="already inside a text_kv_cached block"):
                with text_kv_cached(unet, ctx):
                    pass
        layers = [m for m in unet.modules() if isinstance(m, CachedCrossAttention)]
        assert layers and all(m.kv == [] for m in layers)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_every_convolution_gets_input_in_its_weights_layout(tiny_current, channels_last):
    """A feature map in the other layout than the kernels makes the convolution re-lay out
    its weights on every call (it cost 20% of a UNet step on the CPU)."""
    unet = load_unet(tiny_current, channels_last=channels_last)
    vae = load_vae(tiny_current, channels_last=channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    mismatched = []

    def check(module, args):
        if module.kernel_size != (1, 1) and not args[0].is_contiguous(memory_format=layout):
            mismatched.append(module)
    for m in [*unet.modules(), *vae.modules()]:
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(check)
    with torch.no_grad():
        unet(torch.randn(2, 4, 8, 12).contiguous(memory_format=layout), 500, torch.randn(2, 77, 32))
        vae.decode(torch.randn(1, 4, 8, 12).contiguous(memory_format=layout))
    assert not mismatched


def test_layout_follows_device_and_dtype_unless_asked(tiny_current):
    fp32 = Pipeline.from_pretrained(tiny_current, safety_checker=None)
    bf16 = Pipeline.from_pretrained(tiny_current, safety_checker=None, dtype=torch.bfloat16)
    nchw = Pipeline.from_pretrained(tiny_current, safety_checker=None, dtype=torch.bfloat16,
                                    levers=SpeedLevers(channels_last=False))
    assert fp32.unet.conv_in.weight.is_contiguous()
    for module in (bf16.unet.conv_in, bf16.vae.decoder.conv_in, fp32.vae.decoder.conv_in):
        assert module.weight.is_contiguous(memory_format=torch.channels_last)
    for module in (nchw.unet.conv_in, nchw.vae.decoder.conv_in):
        assert module.weight.is_contiguous()


@pytest.mark.parametrize("cache", [False, None], ids=["in-process", "packaged"])
def test_compiled_pipeline_matches_and_never_recompiles(tiny_current, cache):
    """Both CPU paths: torch.compile in the process (no package cache), and the UNet compiled
    ahead of time into the package cache (compile_cache.py; tests/test_compile_cache.py)."""
    torch._dynamo.reset()
    eager = Pipeline.from_pretrained(tiny_current, safety_checker=None)
    compiled = Pipeline.from_pretrained(tiny_current, safety_checker=None, compile=True, compile_cache=cache)
    run = dict(num_inference_steps=3, output_type="np", height=64, width=64)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompt, seed in (("a red cube", 0), ("another prompt, same size", 1)):
            want = eager(prompt, generator=torch.Generator().manual_seed(seed), **run).images
            got = compiled(prompt, generator=torch.Generator().manual_seed(seed), **run).images
            assert np.abs(got - want).max() <= COMPILED_TOL * 10  # images in [0, 1]
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad(), text_kv_cached(compiled.unet, ctx):
        assert rel_err(compiled.unet(x, 10, ctx), eager.unet(x, 10, ctx)) <= COMPILED_TOL


def test_bfloat16_image_close_to_float32(tiny_current):
    run = dict(prompt="a red cube", num_inference_steps=5, output_type="np", height=64, width=64)
    fp32 = Pipeline.from_pretrained(tiny_current, safety_checker=None)
    bf16 = Pipeline.from_pretrained(tiny_current, safety_checker=None, dtype=torch.bfloat16)
    assert bf16.text_encoder.final_layer_norm.weight.dtype == torch.float32  # kept in fp32 on purpose
    want = fp32(**run, generator=torch.Generator().manual_seed(0)).images
    got = bf16(**run, generator=torch.Generator().manual_seed(0)).images
    assert psnr(got, want) >= BF16_MIN_PSNR


def test_fused_weights_follow_a_load_that_assigns_new_tensors(tiny_current):
    unet, plain = load_unet(tiny_current), load_unet(tiny_current)
    apply_levers(SpeedLevers(), unet)
    g = torch.Generator().manual_seed(4)
    state = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in plain.state_dict().items()}
    unet.load_state_dict(state, assign=True)
    plain.load_state_dict(state)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        assert rel_err(unet(x, 10, ctx), plain(x, 10, ctx)) <= REL_TOL


def test_fused_weights_follow_dtype_conversion(tiny_current):
    unet = load_unet(tiny_current)
    apply_levers(SpeedLevers(), unet)
    unet.to(torch.bfloat16)
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert isinstance(attn, FusedSelfAttention) and attn.qkv_weight.dtype == torch.bfloat16
    assert attn.to_q.weight.data_ptr() == attn.qkv_weight.data_ptr()  # still views, no copy
    x, ctx = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), torch.randn(1, 77, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert unet(x, 1, ctx).dtype == torch.bfloat16
