"""The fast paths keep parity, each at its own tolerance: fused QKV and precomputed
cross-attention K/V (exact math, fp32 tolerance), torch.compile (inductor's fused kernels
reorder float sums), bfloat16 (PSNR against fp32)."""
import diffusers
import numpy as np
import pytest
import torch

from minisd import load_unet, load_vae
from minisd.pipeline import Pipeline

REL_TOL = 1e-5        # fused QKV + cached K/V: max |diff| / max |ref|
COMPILED_TOL = 1e-4   # compiled UNet step, fp32: max |diff| / max |ref|
BF16_MIN_PSNR = 30.0  # dB, bfloat16 image against the float32 image, same seed


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fused_qkv_and_cached_cross_kv_match_diffusers(tiny_current, channels_last):
    ref = diffusers.UNet2DConditionModel.from_pretrained(tiny_current / "unet").eval()
    unet = load_unet(tiny_current, channels_last=channels_last)
    unet.fuse_qkv()
    assert sorted(unet.state_dict()) == sorted(ref.state_dict())  # keys unchanged by fusion
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 77, 32, generator=g)
    kv = unet.precompute_cross_kv(ctx)
    with torch.no_grad():
        expected = ref(x, 500, ctx).sample
        assert rel_err(unet(x, 500, kv), expected) <= REL_TOL
        assert rel_err(unet(x, 500, ctx), expected) <= REL_TOL


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


def test_layout_follows_device_and_dtype(tiny_current):
    fp32 = Pipeline.from_pretrained(tiny_current, safety_checker=None)
    bf16 = Pipeline.from_pretrained(tiny_current, safety_checker=None, dtype=torch.bfloat16)
    assert fp32.unet.conv_in.weight.is_contiguous()
    for module in (bf16.unet.conv_in, bf16.vae.decoder.conv_in, fp32.vae.decoder.conv_in):
        assert module.weight.is_contiguous(memory_format=torch.channels_last)


def test_compiled_pipeline_matches_and_never_recompiles(tiny_current):
    torch._dynamo.reset()
    eager = Pipeline.from_pretrained(tiny_current, safety_checker=None)
    compiled = Pipeline.from_pretrained(tiny_current, safety_checker=None, compile=True)
    run = dict(num_inference_steps=3, output_type="np", height=64, width=64)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompt, seed in (("a red cube", 0), ("another prompt, same size", 1)):
            want = eager(prompt, generator=torch.Generator().manual_seed(seed), **run).images
            got = compiled(prompt, generator=torch.Generator().manual_seed(seed), **run).images
            assert np.abs(got - want).max() <= COMPILED_TOL * 10  # images in [0, 1]
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        kv = eager.unet.precompute_cross_kv(ctx)
        assert rel_err(compiled.unet(x, 10, kv), eager.unet(x, 10, kv)) <= COMPILED_TOL


def test_bfloat16_image_close_to_float32(tiny_current):
    run = dict(prompt="a red cube", num_inference_steps=5, output_type="np", height=64, width=64)
    fp32 = Pipeline.from_pretrained(tiny_current, safety_checker=None)
    bf16 = Pipeline.from_pretrained(tiny_current, safety_checker=None, dtype=torch.bfloat16)
    assert bf16.text_encoder.final_layer_norm.weight.dtype == torch.float32  # kept in fp32 on purpose
    want = fp32(**run, generator=torch.Generator().manual_seed(0)).images
    got = bf16(**run, generator=torch.Generator().manual_seed(0)).images
    assert psnr(got, want) >= BF16_MIN_PSNR


def test_fused_weights_follow_dtype_conversion(tiny_current):
    unet = load_unet(tiny_current)
    unet.fuse_qkv()
    unet.to(torch.bfloat16)
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.qkv_weight.dtype == torch.bfloat16
    assert attn.to_q.weight.data_ptr() == attn.qkv_weight.data_ptr()  # still views, no copy
    x, ctx = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), torch.randn(1, 77, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert unet(x, 1, ctx).dtype == torch.bfloat16
