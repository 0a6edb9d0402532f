"""The loader: every checkpoint tensor used, every parameter filled, in both formats and for
the real small-sd inventory; corrupt, missing and hostile files refused with clear errors."""
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minisd.checkpoint import (find_weights, is_ignorable, read_tensors, rename_legacy_keys,
                               load_component)
from minisd.clip import CLIPTextModel
from minisd.config import small_sd, UNetConfig
from minisd.errors import CheckpointError
from minisd.safety import SafetyChecker
from minisd.unet import UNet2DConditionModel, load_unet
from minisd.vae import AutoencoderKL, load_vae

INVENTORY = Path(__file__).parent / "data" / "small-sd-tensors.tsv"  # every tensor of small-sd: data/README.md
MODELS = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
          "safety_checker": SafetyChecker}


def read_inventory() -> dict[str, dict[str, tuple[int, ...]]]:
    inventory: dict[str, dict[str, tuple[int, ...]]] = {}
    for line in INVENTORY.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        component, key, shape, _dtype = line.split("\t")
        inventory.setdefault(component, {})[key] = tuple(int(d) for d in shape.split("x"))
    return inventory


@pytest.mark.parametrize("component", list(MODELS))
def test_real_small_sd_inventory_maps_one_to_one(component):
    """Every tensor of the real small-sd folder (legacy names) lands on a minisd parameter of
    the same shape, and every parameter is filled: checked on the meta device, no weights."""
    with torch.device("meta"):
        model = MODELS[component](small_sd()[component])
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tensors = read_inventory()[component]
    renamed = rename_legacy_keys(component, {k: torch.empty(s, device="meta") for k, s in tensors.items()})
    used = {k: tuple(v.shape) for k, v in renamed.items() if not is_ignorable(component, k)}
    assert used == expected
    if component == "unet":
        assert sum(v.numel() for v in model.parameters()) == 579_384_964


@pytest.mark.parametrize("component", list(MODELS))
def test_fixture_tensors_all_used(tiny_formats, component):
    files = find_weights(tiny_formats, component)
    state = rename_legacy_keys(component, read_tensors(files[0]))
    model = load_component(tiny_formats, component, MODELS[component], type(small_sd()[component]))
    expected = set(model.state_dict())
    used = {k for k in state if not is_ignorable(component, k)}
    assert used == expected
    ignored = set(state) - used
    if "legacy" in str(tiny_formats) and component in ("text_encoder", "safety_checker"):
        assert ignored and all(k.endswith("position_ids") for k in ignored)
    else:
        assert not ignored


def test_formats_hold_the_same_weights(tiny_current, tiny_legacy):
    a, b = load_vae(tiny_current), load_vae(tiny_legacy)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# --- bad files ------------------------------------------------------------------------

@pytest.fixture
def copy_of(tmp_path, tiny_current):
    def copy(src: Path = tiny_current) -> Path:
        dst = tmp_path / "model"
        shutil.copytree(src, dst)
        return dst
    return copy


def unet_file(folder: Path) -> Path:
    return find_weights(folder, "unet")[0]


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="folder missing"):
        load_unet(tmp_path)


def test_missing_weights(copy_of):
    folder = copy_of()
    unet_file(folder).unlink()
    with pytest.raises(CheckpointError, match=r"unet: no weights in .*unet.*found: config.json"):
        load_unet(folder)


def test_truncated_safetensors(copy_of):
    folder = copy_of()
    path = unet_file(folder)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors: corrupt or truncated"):
        load_unet(folder)


def test_random_bytes_as_bin(copy_of):
    folder = copy_of()
    unet_file(folder).unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.bin: not a readable PyTorch checkpoint"):
        load_unet(folder)


class RunsCode:
    """Unpickling this calls `Path.touch` on a marker file: it would run code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_refused_and_never_runs(copy_of, tmp_path):
    folder = copy_of()
    marker = tmp_path / "pwned"
    unet_file(folder).unlink()
    torch.save({"conv_in.weight": RunsCode(marker)}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"refused to load.*never executes"):
        load_unet(folder)
    assert not marker.exists()


def test_shape_mismatch_names_file_and_key(copy_of):
    folder = copy_of()
    path = unet_file(folder)
    state = read_tensors(path)
    state["conv_in.weight"] = torch.zeros(5, 4, 3, 3)
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"(?s)diffusion_pytorch_model.safetensors.*shape of conv_in.weight: "
                                              r"file has \(5, 4, 3, 3\), model needs \(32, 4, 3, 3\)"):
        load_unet(folder)


def test_missing_and_unexpected_keys_are_named(copy_of):
    folder = copy_of()
    path = unet_file(folder)
    state = read_tensors(path)
    state["extra.weight"] = state.pop("conv_out.bias")
    save_file(state, path)
    with pytest.raises(CheckpointError) as e:
        load_unet(folder)
    assert "1 missing: conv_out.bias" in str(e.value) and "1 unexpected: extra.weight" in str(e.value)


def test_integer_tensor_for_a_weight(copy_of):
    folder = copy_of()
    path = unet_file(folder)
    state = read_tensors(path)
    state["conv_in.bias"] = state["conv_in.bias"].long()
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"dtype of conv_in.bias: file has torch.int64"):
        load_unet(folder)


def test_bad_config(copy_of):
    folder = copy_of()
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"unet.config.json: not valid JSON"):
        load_unet(folder)
    (folder / "unet" / "config.json").write_text('{"block_out_channels": [32, 64], "norm_num_groups": 8}')
    with pytest.raises(CheckpointError, match=r"one entry per block_out_channels"):
        load_unet(folder)


def test_unsupported_unet_setting():
    with pytest.raises(CheckpointError, match=r"use_linear_projection=True"):
        UNetConfig.from_dict({"use_linear_projection": True})


def test_fp16_variant_and_shards(copy_of):
    folder = copy_of()
    path = unet_file(folder)
    state = read_tensors(path)
    half = {k: v.half() for k, v in state.items()}
    save_file(half, folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    unet = load_unet(folder, variant="fp16")
    assert torch.equal(unet.conv_in.weight, state["conv_in.weight"].half().float())
    with pytest.raises(CheckpointError, match="no variant 'bf16' weights"):
        load_unet(folder, variant="bf16")
    # Shard the full-precision file in two, with an index, and drop the single file.
    keys = sorted(state)
    save_file({k: state[k] for k in keys[::2]}, folder / "unet" / "diffusion_pytorch_model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in keys[1::2]}, folder / "unet" / "diffusion_pytorch_model-00002-of-00002.safetensors")
    import json
    weight_map = {k: f"diffusion_pytorch_model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    path.unlink()
    unet = load_unet(folder)
    assert torch.equal(unet.conv_in.weight, state["conv_in.weight"])


# --- how tensors are read ---------------------------------------------------------------

def write_safetensors_in_order(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A .safetensors file with the tensors in the given order (save_file sorts them by
    alignment): https://github.com/huggingface/safetensors#format"""
    import json
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    header, blobs, offset = {}, [], 0
    for key, t in tensors.items():
        data = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_stored_tensors_read_as_the_safetensors_library_does(tmp_path):
    """minisd reads .safetensors bytes itself (mapped, or straight into a converted tensor):
    every way of reading gives what safetensors.torch.load_file gives. A 6-byte tensor first
    puts the next ones at offsets their element size does not divide (no mapping then)."""
    import safetensors.torch
    from minisd.safetensors_reader import stored_tensors

    g = torch.Generator().manual_seed(0)
    tensors = {"odd_half": torch.randn(3, generator=g).half(),
               "conv": torch.randn(5, 3, 3, 3, generator=g), "bf": torch.randn(7, 2, generator=g).bfloat16(),
               "empty": torch.zeros(0, 3), "int": torch.arange(5)}
    for name, layout in (("saved", None), ("unaligned", tensors)):
        path = tmp_path / f"{name}.safetensors"
        if layout is None:
            safetensors.torch.save_file(tensors, path)
        else:
            write_safetensors_in_order(path, tensors)
        reference = safetensors.torch.load_file(path)
        stored = stored_tensors(path)
        assert set(stored) == set(reference)
        assert (stored["conv"].mapped() is None) == (name == "unaligned")
        for key, ref in reference.items():
            s = stored[key]
            assert (s.shape, s.dtype) == (ref.shape, ref.dtype)
            assert torch.equal(s.read(), ref)
            if s.mapped() is not None:
                assert torch.equal(s.mapped(), ref)
            if ref.is_floating_point():
                as_bf16 = s.read(torch.bfloat16, torch.channels_last)
                assert torch.equal(as_bf16, ref.bfloat16())
                if ref.dim() == 4:
                    assert as_bf16.is_contiguous(memory_format=torch.channels_last)


def test_loaded_weights_never_write_to_the_file(copy_of):
    """fp32 weights stay in the file's mapping, copy-on-write: changing them in memory must
    leave the user's file as it was."""
    folder = copy_of()
    path = find_weights(folder, "text_encoder")[0]
    before = path.read_bytes()
    encoder = load_component(folder, "text_encoder", CLIPTextModel, type(small_sd()["text_encoder"]))
    with torch.no_grad():
        for p in encoder.parameters():
            p.fill_(3.0)
    del encoder
    assert path.read_bytes() == before


def test_channels_last_load_is_the_same_model(tiny_current):
    a, b = load_unet(tiny_current), load_unet(tiny_current, dtype=torch.bfloat16, channels_last=True)
    assert b.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va.bfloat16(), vb)
