"""The `minisd` command.

    minisd generate "an apple, 4k" -o apple.png --steps 25 -s 42 -n "blurry" -b 2
    minisd generate "an apple, oil painting" --init-image photo.jpg --strength 0.6 -o painted.png
    minisd batch prompts.txt --out images/ -s 1        (batch.py; under torchrun, many workers)
    minisd serve --port 7860                           (server/; web UI and A1111 API)

Usage and input errors print one line and exit 2; other failures print one line and exit 1;
`--debug` shows the traceback instead. No existing file is overwritten without --overwrite,
and every image is written atomically (a temporary file renamed into place).
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from pathlib import Path

from . import __version__
from .errors import CheckpointError, InputError, MinisdError
from .files import read_image, save_png_atomically
from .folders import cache_entry, newest_snapshot
from .img2img import DEFAULT_STRENGTH
from .pnginfo import generation_parameters
from .runtime import MAX_SEED
from .step_skipping import FAST_STEPS, check_step_skipping_options, step_skipping

HUB_REPO = "OFA-Sys/small-stable-diffusion-v0"
EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "weights" / "minisd-shapes"
DTYPES = ("auto", "float32", "float16", "bfloat16")

GET_WEIGHTS = ("no model found. Download OFA-Sys/small-stable-diffusion-v0 (e.g. `huggingface-cli "
               "download OFA-Sys/small-stable-diffusion-v0`) and pass its folder with --model or "
               "$MINISD_MODEL; see README.md, section 'Weights'.")


class UsageError(InputError):
    """A command-line argument that cannot be parsed."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; we want one line
        raise UsageError(f"{self.prog}: {message}")

    def parse_known_args(self, args=None, namespace=None):
        args, rest = super().parse_known_args(args, namespace)
        if getattr(args, "steps", 0) is None:  # --steps not given: its default depends on --fast
            args.steps = FAST_STEPS if args.fast else 25
        return args, rest


def build_parser() -> ArgumentParser:
    # Short options follow stable-diffusion.cpp's where it has them (-n negative prompt,
    # -b image count, -s seed, -W/-H size, -m model).
    common = ArgumentParser(add_help=False)  # options every command takes
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    model = ArgumentParser(add_help=False)  # which model, on what, how: generate, batch and serve
    model.add_argument("-m", "--model", help="diffusers pipeline folder, or a hub id (org/name) read from "
                       "the Hugging Face cache (default: $MINISD_MODEL, the Hugging Face cache, then the "
                       "embedded model)")
    model.add_argument("--device", default="auto",
                       help="auto, cpu, cuda, cuda:1, mps, ... (default auto: CUDA when available, then "
                            "Apple's MPS, else the CPU)")
    model.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="auto (for the device chosen): float16 on CUDA, bfloat16 on CPUs with native bf16 "
                            "(AVX512-BF16, AMX), else float32")
    model.add_argument("--compile", action="store_true",
                       help="torch.compile the UNet and the VAE decoder (on the CPU with frozen weights): "
                            "the first image of each size compiles, for a minute or more; on the CPU "
                            "once per model and size, kept in ~/.cache/minisd/compiled ($MINISD_COMPILE_CACHE; "
                            "off to keep nothing)")
    model.add_argument("--int8", action="store_true",
                       help="static int8 UNet on x86 CPUs (needs the int8 extra): the first image of a size "
                            "calibrates on a few generations and compiles (the compiled int8 UNet kept "
                            "as --compile's is); combine with --compile")
    model.add_argument("--no-levers", action="store_true",
                       help="run the models exactly as written, without the speed levers of minisd/fast.py")
    model.add_argument("--no-safety-checker", action="store_true", help="do not filter images (logged)")
    generation = ArgumentParser(add_help=False)  # what to generate: generate and batch
    generation.add_argument("-n", "--negative", default="", help="negative prompt")
    generation.add_argument("--steps", type=int, help="denoising steps (default 25; 20 with --fast)")
    generation.add_argument("--guidance", type=float, default=7.5,
                            help="classifier-free guidance scale (default 7.5)")
    generation.add_argument("-s", "--seed", type=int, help="random seed (default: random, printed); image i uses seed+i")
    generation.add_argument("--size", type=parse_size, help="WxH, multiples of 8 (default: the model's size)")
    generation.add_argument("-W", "--width", type=int, help="image width (default: the model's; or use --size)")
    generation.add_argument("-H", "--height", type=int, help="image height (default: the model's; or use --size)")
    generation.add_argument("--init-image", type=Path, metavar="PATH",
                            help="img2img: start from this image (any size and mode); the output has its size "
                                 "unless --size/-W/-H are given")
    generation.add_argument("--strength", type=float, metavar="S",
                            help=f"img2img: how much of the init image to redraw, in (0, 1] (default {DEFAULT_STRENGTH})")
    generation.add_argument("--clip-skip", type=int, default=1, metavar="N",
                            help="use the text encoder's N-th layer from the end, as in AUTOMATIC1111: "
                                 "1 = the last (default), 2 = the penultimate, ...")
    generation.add_argument("--prompt-syntax", choices=("a1111", "plain"), default="a1111",
                            help="a1111 (default): (word:1.2) emphasis, [word], BREAK and prompts of any length, as "
                                 "AUTOMATIC1111 and stable-diffusion.cpp read them; plain: the text as is, cut at "
                                 "77 tokens, as diffusers reads it")
    generation.add_argument("--gate-step", type=int, metavar="K",
                            help="T-GATE: after K steps, freeze cross-attention and stop guidance (faster, "
                                 "less faithful; README, Speed)")
    generation.add_argument("--cache-interval", type=int, metavar="N",
                            help="DeepCache: run the whole UNet every N-th step, only its shallow part between")
    generation.add_argument("--cache-branch", type=int, metavar="B",
                            help="DeepCache: the skip branch below which features are cached (default 0: a "
                                 "shallow step runs only the last up layer)")
    generation.add_argument("--fast", action="store_true",
                            help="the preset on the measured speed/quality frontier: 20 steps, --gate-step at 60%% "
                                 "of the steps, --cache-interval 2 caching the last up block (--cache-branch = the "
                                 "model's layers per block); options given explicitly win (README, Speed)")
    generation.add_argument("--quiet", action="store_true", help="no progress bar")
    parser = ArgumentParser(prog="minisd", parents=[common],
                            description="Stable Diffusion v1 in plain PyTorch: text-to-image, image-to-image, "
                                        "and a server for both.")
    parser.add_argument("--version", action="version", version=f"minisd {__version__}")
    commands = parser.add_subparsers(dest="command", parser_class=ArgumentParser)
    gen = commands.add_parser("generate", parents=[common, model, generation], help="generate images from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", type=Path, default=Path("minisd.png"),
                     help="PNG to write; with -b > 1, NAME-0.png, NAME-1.png, ... (default: minisd.png)")
    gen.add_argument("-b", "--num-images", type=int, default=1, help="images to generate (default 1)")
    gen.add_argument("--overwrite", action="store_true", help="replace existing output files")
    batch = commands.add_parser("batch", parents=[common, model, generation],
                                help="one image per line of a prompt file, resumable; scales out under torchrun")
    batch.add_argument("prompts", type=Path, metavar="PROMPTS",
                       help="a text file, one prompt a line (blank lines and # comments skipped), or a .jsonl "
                            "file whose lines may also set negative_prompt, seed, steps, guidance, width, "
                            "height, init_image, strength")
    batch.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="folder for the images and manifest.jsonl; rerunning the same command resumes")
    serve = commands.add_parser("serve", parents=[common, model],
                                help="a web UI and AUTOMATIC1111's REST API on one loaded model "
                                     "(needs pip install -e \".[ui]\")")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860, as AUTOMATIC1111's)")
    serve.add_argument("--max-size", type=parse_size, metavar="WxH",
                       help="largest image a request may ask for (default: twice the model's size each way)")
    serve.add_argument("--max-steps", type=int, default=150, help="most steps a request may ask for (default 150)")
    serve.add_argument("--max-images", type=int, default=8,
                       help="most images one request may ask for, batch_size x n_iter (default 8)")
    return parser


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH such as 512x512, got {text!r}") from None
    return w, h


def find_model(explicit: str | Path | None) -> str | Path:
    """--model (a folder or a hub id, which Pipeline.from_pretrained resolves), else
    $MINISD_MODEL, else a Hugging Face cache snapshot of small-sd (read without
    huggingface_hub), else the embedded model shipped in weights/."""
    if explicit is not None:
        return explicit
    if os.environ.get("MINISD_MODEL"):
        return Path(os.environ["MINISD_MODEL"])
    snapshot = newest_snapshot(cache_entry(HUB_REPO))
    if snapshot is not None:
        return snapshot
    if (EMBEDDED_MODEL / "model_index.json").is_file():
        return EMBEDDED_MODEL
    raise CheckpointError(GET_WEIGHTS)


def output_paths(output: Path, n: int) -> list[Path]:
    if output.suffix.lower() != ".png":
        raise InputError(f"--output: images are written as PNG; name a .png file, got {str(output)!r}")
    if n == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(n)]


def check_writable(paths: list[Path], overwrite: bool) -> None:
    """Refuse before any work is done: a missing folder, a read-only one, an existing file."""
    for path in paths:
        folder = path.parent
        if not folder.is_dir():
            raise InputError(f"--output: folder {str(folder)!r} does not exist")
        if not os.access(folder, os.W_OK):
            raise InputError(f"--output: folder {str(folder)!r} is not writable")
        if path.is_dir():
            raise InputError(f"--output: {str(path)!r} is a folder; name a .png file")
        if path.exists() and not overwrite:
            raise InputError(f"--output: {str(path)!r} exists; choose another name or pass --overwrite")


def load_pipeline(args: argparse.Namespace, before_loading=lambda: None):
    """The model the options name, on the device and in the dtype they ask for. The device is
    checked before anything loads (torch would fail deep in the loader), then `before_loading`."""
    from .fast import SpeedLevers
    from .pipeline import Pipeline
    from .runtime import check_device

    device = resolve_device(args.device)
    check_device(device, "--device")
    dtype = resolve_dtype(args.dtype, device)
    model = find_model(args.model)
    before_loading()
    extra = {"safety_checker": None} if args.no_safety_checker else {}
    levers = SpeedLevers.none() if args.no_levers else SpeedLevers()
    if args.int8:
        extra["quantize"] = "int8"
    return Pipeline.from_pretrained(model, device=device, dtype=dtype, compile=args.compile, levers=levers, **extra)


def serve(args: argparse.Namespace) -> int:
    """`minisd serve`: the web UI and the A1111 API on one loaded model, until interrupted."""
    try:
        import fastapi  # noqa: F401 - only to say what is missing before anything loads
        import gradio  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise InputError(f"serve: needs the optional web dependencies ({e.name} is missing); install them "
                         "with pip install -c requirements-pins.txt -e \".[ui]\"") from None
    from .server.app import check_port_free, serve as run_server
    from .server.worker import Limits

    if not 1 <= args.port <= 65535:
        raise InputError(f"--port: must lie in [1, 65535], got {args.port}")
    for name in ("max_steps", "max_images"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if args.max_size and min(args.max_size) < 1:
        raise InputError(f"--max-size: must be positive, got {args.max_size[0]}x{args.max_size[1]}")
    pipe = load_pipeline(args, before_loading=lambda: check_port_free(args.host, args.port))
    native = pipe.unet.config.sample_size * pipe.vae.downscale_factor
    width, height = args.max_size or (2 * native, 2 * native)
    limits = Limits(width, height, args.max_steps, args.max_images)
    run_server(pipe, str(args.model or find_model(None)), args.host, args.port, limits)
    return 0


def generate(args: argparse.Namespace) -> int:
    import torch

    if args.num_images < 1:
        raise InputError(f"-b/--num-images: must be at least 1, got {args.num_images}")
    if args.size and (args.width is not None or args.height is not None):
        raise InputError("--size: give the size as --size WxH or as -W/-H, not both")
    if args.negative.strip().isdigit():  # -n used to be the image count; a number is likely a mix-up
        logging.getLogger("minisd").warning(
            "the negative prompt is %r: -n is the negative prompt (as in stable-diffusion.cpp); "
            "the number of images is -b", args.negative)
    seed = random.randrange(2**32) if args.seed is None else args.seed
    if not 0 <= seed <= MAX_SEED - args.num_images:
        raise InputError(f"--seed: must lie in [0, {MAX_SEED - args.num_images}], got {seed}")
    strength = check_strength(args.strength, args.init_image is not None)
    if args.clip_skip < 1:
        raise InputError(f"--clip-skip: must be at least 1 (1 = the text encoder's last layer, 2 = the "
                         f"penultimate, as in AUTOMATIC1111), got {args.clip_skip}")
    check_step_skipping_options(args)
    paths = output_paths(args.output, args.num_images)
    check_writable(paths, args.overwrite)
    init_image = None if args.init_image is None else read_image(args.init_image)
    pipe = load_pipeline(args)
    width, height = args.size or (args.width, args.height)
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(args.num_images)]
    try:
        result = pipe(args.prompt, negative_prompt=args.negative, height=height, width=width,
                      num_inference_steps=args.steps, guidance_scale=args.guidance,
                      num_images_per_prompt=args.num_images, generator=generators, progress=not args.quiet,
                      image=init_image, strength=strength, clip_skip=args.clip_skip - 1,
                      prompt_syntax=args.prompt_syntax, **step_skipping(args, pipe))
    except InputError as e:
        if not str(e).startswith("clip_skip"):
            raise
        # The pipeline counts as diffusers does (0 = the last layer, up to the layer count);
        # say it in the option's terms.
        layers = pipe.text_encoder.config.num_hidden_layers
        raise InputError(f"--clip-skip: must lie in [1, {layers + 1}] for this model (its text encoder "
                         f"has {layers} layers; 1 = the last), got {args.clip_skip}") from None
    if args.seed is None:
        print(f"seed: {seed}", file=sys.stderr)
    flagged = result.nsfw_content_detected or [False] * len(paths)
    for i, (image, path) in enumerate(zip(result.images, paths)):
        text = generation_parameters(args.prompt, args.negative, args.steps, pipe.scheduler.sampler_name,
                                     args.guidance, seed + i, image.width, image.height, pipe.name,
                                     denoising_strength=strength, clip_skip=args.clip_skip,
                                     **step_skipping(args, pipe))
        save_png_atomically(image, path, text, args.overwrite)
        note = " (blacked out: the safety checker flagged it)" if flagged[i] else ""
        print(f"wrote {path}{note}")
    return 0


def check_strength(strength: float | None, img2img: bool) -> float | None:
    """--strength, or its default for img2img; None without --init-image."""
    if not img2img:
        if strength is not None:
            raise InputError("--strength: applies to img2img only; give --init-image too")
        return None
    if strength is None:
        return DEFAULT_STRENGTH
    if not 0 < strength <= 1:  # also refuses nan
        raise InputError(f"--strength: must lie in (0, 1] (how much of the init image to redraw), got {strength}")
    return strength


def resolve_device(name: str) -> str:
    """--device auto: CUDA when available, then Apple's MPS, else the CPU."""
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def resolve_dtype(name: str, device: str):
    """--dtype auto: float16 on CUDA; bfloat16 on CPUs with native bf16, for every model size.
    Measured for the smallest, the embedded 10.6M-parameter minisd-shapes (64x64, 25 steps, 2
    threads, medians of 5-7, both dtypes alternated): bf16 took 0.75-0.89 of fp32's time per
    image in batches of 2, 4 and 10, and 0.89-1.09 for single images (level within this shared
    machine's noise), so small models keep bf16 too."""
    import torch

    if name == "auto":
        if str(device).startswith("cuda"):
            return torch.float16
        return torch.bfloat16 if str(device) == "cpu" and cpu_has_native_bf16() else torch.float32
    return getattr(torch, name)


def cpu_has_native_bf16() -> bool:
    """bf16 matrix products run at twice the fp32 rate only with these instructions; elsewhere
    bf16 is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(level=logging.WARNING, format="minisd: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        if args.command == "batch":
            from .batch import run_batch
            return run_batch(args, load_pipeline)
        return generate(args) if args.command == "generate" else serve(args)
    except KeyboardInterrupt:
        print("minisd: interrupted; no partial file was written", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        code = 2 if isinstance(e, InputError) else 1
        kind = "" if isinstance(e, MinisdError) else f"{type(e).__name__}: "
        message = str(e).splitlines()[0] if isinstance(e, UsageError) else " ".join(str(e).split())
        print(f"minisd: error: {kind}{message}", file=sys.stderr)
        return code
