"""Parity of the text encoder, UNet and VAE with transformers/diffusers on the same weights.

minisd loads each fixture format; the reference always loads the current-format folder
(the same weights). fp32 on the CPU.
"""
import diffusers
import pytest
import torch
import transformers

from minisd import load_text_encoder, load_unet, load_vae

REL_TOL = 1e-5  # max |minisd - reference| / max |reference|


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def test_text_encoder_parity(tiny_formats, tiny_current):
    ref = transformers.CLIPTextModel.from_pretrained(tiny_current / "text_encoder").eval()
    ours = load_text_encoder(tiny_formats)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49406, (3, 77), generator=g)
    ids[:, 0], ids[:, 20], ids[:, 21:] = 49406, 49407, 49407  # bos ... eos, pad
    with torch.no_grad():
        expected = ref(ids).last_hidden_state
        assert rel_err(ours(ids), expected) <= REL_TOL
        assert rel_err(ours(ids[:1, :10]), ref(ids[:1, :10]).last_hidden_state) <= REL_TOL


UNET_VARIANTS = {
    "small-sd-like": {},  # layers_per_block 1, attention_head_dim int
    "sd-v1-like": {"layers_per_block": 2, "attention_head_dim": [2, 4, 4]},
}


@pytest.mark.parametrize("variant", list(UNET_VARIANTS))
@pytest.mark.parametrize("fmt", ["current", "legacy"])
@pytest.mark.parametrize("batch, size, timestep", [
    (1, (8, 8), 999),               # square, scalar timestep
    (3, (8, 12), [1, 500, 981]),     # non-square, per-sample timesteps
    (1, (6, 10), torch.tensor(250)),  # odd halvings: 6 -> 3 -> 2 on the way down
])
def test_unet_parity(make_tiny, variant, fmt, batch, size, timestep):
    overrides = {"unet": UNET_VARIANTS[variant]} if UNET_VARIANTS[variant] else {}
    ref = diffusers.UNet2DConditionModel.from_pretrained(make_tiny("current", **overrides) / "unet").eval()
    ours = load_unet(make_tiny(fmt, **overrides))
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, *size, generator=g)
    context = torch.randn(batch, 77, ref.config.cross_attention_dim, generator=g)
    t = torch.tensor(timestep) if isinstance(timestep, list) else timestep
    with torch.no_grad():
        expected = ref(sample, t, context).sample
        got = ours(sample, t, context)
    assert expected.std() > 1e-3  # the fixture's weights do not collapse the output
    assert rel_err(got, expected) <= REL_TOL


def test_unet_does_not_modify_inputs(tiny_current):
    unet = load_unet(tiny_current)
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    before = sample.clone(), context.clone()
    with torch.no_grad():
        unet(sample, 10, context)
    assert torch.equal(before[0], sample) and torch.equal(before[1], context)


@pytest.mark.parametrize("size", [(8, 8), (6, 10)])
def test_vae_decode_parity(tiny_formats, tiny_current, size):
    ref = diffusers.AutoencoderKL.from_pretrained(tiny_current / "vae").eval()
    ours = load_vae(tiny_formats)
    z = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.decode(z).sample
        assert rel_err(ours.decode(z), expected) <= REL_TOL
    assert ours.scaling_factor == pytest.approx(0.18215)


def test_vae_encode_parity(tiny_formats, tiny_current):
    ref = diffusers.AutoencoderKL.from_pretrained(tiny_current / "vae").eval()
    ours = load_vae(tiny_formats)
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
    assert rel_err(mean, dist.mean) <= REL_TOL
    assert rel_err(logvar, dist.logvar) <= REL_TOL
