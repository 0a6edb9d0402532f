"""Shrink a Stable Diffusion v1 UNet to one layer per block, as small-stable-diffusion-v0 was made.

    python tools/shrink_unet.py SRC DST                # SRC: a pipeline folder, layers_per_block=2
    python tools/shrink_unet.py SRC DST --overwrite    # replace DST if it holds anything

small-sd's model card: its UNet has `layers_per_block=1` and was initialised from SD v1-4's by
taking the first layer of each block. What that means, tensor by tensor (teacher: L layers
per block, L >= 2; student: 1):

  down block   the teacher's resnet 0 and attention 0 (and its downsampler). Every down
               resnet after the first reads `out_channels`, so any would fit; the first is
               the one whose input width matches (the block's `in_channels`).
  up block     L + 1 layers in the teacher, 2 in the student. The student's first takes the
               teacher's first; its second takes the teacher's LAST, the only one whose skip
               input has the width the student's second needs: an up block's last resnet
               concatenates the skip from the first layer of the matching down block (that
               block's `in_channels`), the others concatenate `out_channels`.
  the rest     conv_in, the time embedding, the mid block, conv_out: copied.

Every other component (VAE, text encoder, safety checker, tokenizer, scheduler, feature
extractor) is copied as it is. Both checkpoint formats are read: today's safetensors and the
2022-era `.bin` pickles with old key names (opened with `torch.load(weights_only=True)`, which
runs nothing). What is written is today's format: `.safetensors` files under today's key names.
The student UNet is checked against minisd's model of its config before anything is written, and
DST appears only when complete (written beside it under a temporary name, then renamed).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from minisd.checkpoint import (
    WEIGHT_FORMATS,
    WEIGHT_STEMS,
    find_weights,
    is_ignorable,
    read_config,
    read_tensors,
    rename_legacy_keys,
)
from minisd.config import UNetConfig
from minisd.errors import CheckpointError
from minisd.unet import UNet2DConditionModel

# The block types whose layers are `resnets.i` / `attentions.i` in diffusers' key layout.
KNOWN_BLOCKS = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
LAYER_KEY = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$")
# What each model component's weights are called today (diffusers' and transformers' save_pretrained).
CURRENT_WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                   "text_encoder": "model", "safety_checker": "model"}


def teacher_layers(config: dict) -> int:
    """The teacher's layers per block, after checking the UNet is one this recipe can shrink."""
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int) or isinstance(layers, bool):
        raise CheckpointError(f"unet/config.json: layers_per_block is {layers!r}; shrinking needs one "
                              "number for every block (SD v1's layout)")
    if layers < 2:
        raise CheckpointError(f"unet/config.json: layers_per_block is {layers}; the UNet already has "
                              "one layer per block, there is nothing to shrink")
    blocks = list(config.get("down_block_types", [])) + list(config.get("up_block_types", []))
    unknown = sorted(set(blocks) - KNOWN_BLOCKS)
    if unknown:
        raise CheckpointError(f"unet/config.json: block types {unknown} are not SD v1's; shrink_unet "
                              f"knows {sorted(KNOWN_BLOCKS)}")
    return layers


def taken_layer(blocks: str, student_index: int, layers: int) -> int:
    """Which of a teacher block's layers (0..layers, up blocks having one more) the student's
    layer `student_index` is taken from: the first, except an up block's second, the last."""
    return layers if blocks == "up_blocks" and student_index == 1 else 0


def student_keys(teacher_keys, layers: int) -> dict[str, str]:
    """{student key: the teacher key it is taken from}, in the teacher's order."""
    taken = {}
    for key in teacher_keys:
        match = LAYER_KEY.match(key)
        if not match:
            taken[key] = key  # conv_in, time embedding, samplers, mid block, conv_out
            continue
        blocks, block, kind, index, rest = match.groups()
        for student_index in (0, 1) if blocks == "up_blocks" else (0,):
            if taken_layer(blocks, student_index, layers) == int(index):
                taken[f"{blocks}.{block}.{kind}.{student_index}.{rest}"] = key
    return taken


def shrink_state_dict(teacher: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The student UNet's tensors (the same tensor objects as the teacher's), checked key by key
    and shape by shape against minisd's model of the student config."""
    layers = teacher_layers(config)
    student = {key: teacher[source] for key, source in student_keys(teacher, layers).items()}
    student_config = shrink_config(config)
    with torch.device("meta"):
        model = UNet2DConditionModel(UNetConfig.from_dict(student_config, "the student's unet/config.json"))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in student.items()}
    if expected != found:
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        raise CheckpointError(f"the shrunk UNet does not match its config: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}, mis-shaped {wrong[:5]}; is the teacher an SD v1 UNet?")
    return student


def shrink_config(config: dict) -> dict:
    return {**config, "layers_per_block": 1}


def component_weights(folder: Path, component: str, variant: str | None) -> dict[str, torch.Tensor]:
    """One component's tensors under today's names: legacy keys renamed, stored buffers that
    today's models derive (position_ids) dropped."""
    tensors: dict[str, torch.Tensor] = {}
    for path in find_weights(folder, component, variant):
        tensors.update(read_tensors(path))
    renamed = rename_legacy_keys(component, tensors)
    return {key: tensor for key, tensor in renamed.items() if not is_ignorable(component, key)}


def is_weight_file(name: str) -> bool:
    return any(name.startswith((stem + ".", stem + "-")) for stem in WEIGHT_STEMS) and \
        any(name.endswith(ext) for ext in WEIGHT_FORMATS)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses tensors that share memory or are not contiguous; clone() gives each its own.
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def shrink_pipeline(src: Path, dst: Path, variant: str | None = None) -> dict[str, int]:
    """Write the student pipeline folder `dst` (which must not exist) from `src`. Returns the
    UNet parameter counts, {"teacher": ..., "student": ...}."""
    if not (src / "model_index.json").is_file():
        raise CheckpointError(f"{src}: not a pipeline folder (no model_index.json)")
    config = read_config(src, "unet")
    teacher = component_weights(src, "unet", variant)
    student = shrink_state_dict(teacher, config)  # fails before anything is written

    counts = {"teacher": count(teacher), "student": count(student)}

    # Everything but the model components' weight files is copied as it is; those are rewritten.
    rewritten = [c for c in CURRENT_WEIGHTS if (src / c).is_dir() and any(map(is_weight_file, os.listdir(src / c)))]
    shutil.copytree(src, dst, ignore=lambda folder, names: [
        n for n in names if Path(folder).parent == src and Path(folder).name in rewritten and is_weight_file(n)])
    (dst / "unet" / "config.json").write_text(json.dumps(shrink_config(config), indent=2) + "\n")
    save_tensors(student, dst / "unet" / "diffusion_pytorch_model.safetensors")
    del teacher, student
    for component in rewritten:
        if component != "unet":
            save_tensors(component_weights(src, component, variant),
                         dst / component / f"{CURRENT_WEIGHTS[component]}.safetensors")
    return counts


def count(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="the teacher pipeline folder (layers_per_block 2)")
    p.add_argument("dst", type=Path, help="the student pipeline folder to write")
    p.add_argument("--variant", help="read the teacher's weights of this variant (e.g. fp16)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists and is not empty")
    args = p.parse_args(argv)
    src, dst = args.src.resolve(), args.dst.resolve()
    if not src.is_dir():
        p.error(f"{args.src}: no such folder")
    if dst == src or src in dst.parents:
        p.error(f"{args.dst}: the student must be written outside the teacher's folder {args.src}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.overwrite:
        p.error(f"{args.dst} exists and is not empty; choose another DST or pass --overwrite")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        counts = shrink_pipeline(src, tmp, args.variant)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(dst)
    except CheckpointError as e:
        raise SystemExit(f"shrink_unet: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.dst}: UNet {counts['teacher']:,} -> {counts['student']:,} parameters", file=sys.stderr)


if __name__ == "__main__":
    main()
