"""Speed of minisd against diffusers on small-sd's full architecture, side by side.

    python tools/bench.py                                   # CPU: 256x256, 10 steps, 3 repeats
    python tools/bench.py --modes diffusers-fp32,minisd-fp32 --repeats 5 --json /tmp/bench.json
    python tools/bench.py --device cuda --size 512 --steps 25 --diffusers-compiled
    python tools/bench.py --tiny --size 64 --steps 2        # a smoke test of the tool itself

The model is small-sd's exact architecture with seeded random weights
(make_tiny_checkpoint.randomize_), built once and saved in the current diffusers format under
`.cache/bench-small-sd/` (about 3.4 GB; reused while its `bench-model.json` matches). Both
libraries load that same folder, run the same prompt, seed, size, steps and CFG scale, and
each mode's image is kept for a PSNR parity check at the end.

Modes are `LIB-DTYPE[-compiled]`: LIB is diffusers or minisd, DTYPE fp32, bf16 or fp16.
  minisd    `-compiled` passes `compile=` to `Pipeline.from_pretrained` (True: minisd picks the
            mode it measured best; `--minisd-compile MODE` names one).
  diffusers `-compiled` is diffusers' strongest published recipe: fused QKV
            (`pipe.fuse_qkv_projections()`), channels_last UNet and VAE, the UNet under
            torch.compile (mode `reduce-overhead`, i.e. CUDA graphs, on a GPU; `default` on a CPU).
            Behind `--diffusers-compiled`, or name the mode in `--modes`.
No global inductor setting is changed, so no mode tunes the compiler for another.

How it measures
- Every mode lives in its own worker process (spawned, so no state is shared): its load
  time, peak memory (CPU: the process's VmHWM; CUDA: torch.cuda.max_memory_allocated) and
  compile time are its own. Load time is `from_pretrained` (plus moving to the device and the
  compile recipe's setup), disk to ready, with the page cache warm after the first load; the
  library's import time is apart (`import_s` in the JSON). diffusers maps the weights file and
  reads it during the first image; minisd reads what it converts (dtype, channels-last) at
  load. So the table also gives "1st img": load + first image, what a one-off run waits for.
- Warm-up: each worker generates one image right after loading (its "first image": this is
  where torch.compile compiles, each worker with its own empty inductor cache unless
  `--warm-compile-cache`); compile time = first image - median steady image.
- UNet step and VAE decode are timed inside each image, around the calls the pipeline makes
  (the UNet and VAE are wrapped; CUDA events on a GPU, so nothing waits inside the loop): a
  step is the median of the image's CFG UNet calls (batch 2), the decode its one VAE decode.
  Calling the modules directly instead would time other code than the pipeline runs (minisd
  computes the cross-attention K/V once per image) and recompile the compiled modes.
- Alternation: the workers of a group are loaded together and, for each repetition, each
  generates one image in turn (the order rotates every repetition); the table shows medians
  over the repetitions. Groups
  (`--group-by`): `dtype` (default on a CPU) holds at most three fp32 pipelines at once (about
  12 GB) and then the half-precision ones; each group has its own diffusers eager baseline, so
  the ratios that matter are alternated; `none` (default on CUDA) alternates every mode;
  `mode` runs one mode at a time (least memory, no alternation).
- FLOPs: torch.utils.flop_counter on minisd's fp32 UNet and VAE decoder built on the meta
  device (shapes only, attention included; counting a real CPU run misses the attention
  inside SDPA's fused CPU kernel). The text encoder (~1% of an image) is not counted. The
  count is the reference's work: cross-attention K/V projected at every step (minisd projects
  them once per image, 3.8 GFLOP a step less: 1.6% at 256x256).
  Achieved GFLOP/s compare with a matrix-product peak measured in the same run, per dtype
  (4096^3 on a CPU, 8192^3 on CUDA; measured before and after every group, the best kept). On
  CUDA, fp32 convolutions use TF32 by PyTorch's default while the fp32 peak is a true fp32
  product, so fp32 modes can show over 100%.
- Ratios: each mode's seconds per image over diffusers fp32 eager's and over the fastest
  diffusers mode's (below 1: faster). Read ratios, not seconds, on a shared machine.
- Parity: PSNR (dB, images in [0, 1]) of each mode's image against diffusers fp32 and minisd
  fp32. minisd fp32 must reach FP32_MIN_PSNR_DB against diffusers fp32, or diffusers' own
  half-precision PSNR if that is lower (CUDA's default TF32 convolutions make "fp32" about
  fp16-precise); a minisd half-precision mode must come within HALF_MARGIN_DB of diffusers'
  image in that dtype (both against diffusers fp32). Exit status 1 when a check fails or a
  mode errors.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path[:0] = [str(TOOLS), str(ROOT)]  # make_tiny_checkpoint, and this checkout's minisd

PROMPT = "a photograph of an astronaut riding a horse"
SEED = 0
GUIDANCE = 7.5
FP32_MIN_PSNR_DB = 40.0  # minisd fp32 vs diffusers fp32, same seed, whole pipeline (or less: parity_checks)
HALF_MARGIN_DB = 3.0  # minisd half vs diffusers fp32 may be this much below diffusers half's PSNR

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODE_RE = re.compile(r"^(diffusers|minisd)-(fp32|bf16|fp16)(-compiled)?$")
START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Mode:
    lib: str  # "diffusers" or "minisd"
    dtype: str  # "fp32", "bf16", "fp16"
    compiled: bool

    @classmethod
    def parse(cls, name: str) -> "Mode":
        m = MODE_RE.match(name.strip())
        if not m:
            raise ValueError(f"bad mode {name!r}: expected LIB-DTYPE[-compiled], LIB diffusers|minisd, "
                             f"DTYPE fp32|bf16|fp16")
        return cls(m[1], m[2], bool(m[3]))

    @property
    def name(self) -> str:
        return f"{self.lib}-{self.dtype}" + ("-compiled" if self.compiled else "")

    def sort_key(self):  # running order: eager before compiled, fp32 first, diffusers first
        return self.compiled, self.dtype != "fp32", self.lib != "diffusers"

    def table_key(self):  # table order: by dtype, then diffusers eager, minisd eager, compiled
        return self.dtype != "fp32", self.compiled, self.lib != "diffusers"


def default_modes(device: str, diffusers_compiled: bool) -> list[Mode]:
    half = "fp16" if device == "cuda" else "bf16"
    names = ["diffusers-fp32", "minisd-fp32", "minisd-fp32-compiled",
             f"diffusers-{half}", f"minisd-{half}", f"minisd-{half}-compiled"]
    if diffusers_compiled:
        names.append(f"diffusers-{half}-compiled")
    return [Mode.parse(n) for n in names]


# --------------------------------------------------------------------------------------------
# The model folder, FLOPs and the matrix-product peak (in the parent process)
# --------------------------------------------------------------------------------------------

def model_folder(cache_dir: Path, tiny: bool, seed: int) -> Path:
    """The random pipeline folder, built (in a subprocess, so its memory goes back) if missing."""
    import make_tiny_checkpoint as mtc  # here, not at the top: workers must not import diffusers

    folder = cache_dir / ("bench-tiny" if tiny else "bench-small-sd")
    # small-sd's full shapes; the safety checker stays tiny (never run here).
    full = {k: v for k, v in mtc.SMALL_SD.items() if k != "safety_checker"}
    want = {"configs": {} if tiny else full, "seed": seed, "format": "current"}
    marker = folder / "bench-model.json"
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(want)):
        return folder
    log(f"building {'tiny' if tiny else 'full-size small-sd'} random pipeline in {folder} (once)")
    proc = multiprocessing.get_context("spawn").Process(target=_build_model, args=(folder, want))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        sys.exit(f"bench: building the model failed (exit code {proc.exitcode})")
    return folder


def _build_model(folder: Path, want: dict) -> None:
    import diffusers
    import make_tiny_checkpoint as mtc
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.disable_progress_bar()
    components = mtc.build_components(want["seed"], **want["configs"])
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    mtc.write_current(components, tmp)
    (tmp / "bench-model.json").write_text(json.dumps(want, indent=2) + "\n")
    tmp.rename(folder)


def count_flops(folder: Path, size: int) -> dict[str, float]:
    """FLOPs of one CFG UNet step (batch 2) and one VAE decode (batch 1), minisd fp32 on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    from minisd.checkpoint import read_config
    from minisd.config import UNetConfig, VAEConfig
    from minisd.unet import UNet2DConditionModel
    from minisd.vae import AutoencoderKL

    uc = UNetConfig.from_dict(read_config(folder, "unet"))
    vc = VAEConfig.from_dict(read_config(folder, "vae"))
    h = size // vc.downscale_factor
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(uc), AutoencoderKL(vc)
        latents = torch.empty(2, uc.in_channels, h, h)
        context = torch.empty(2, 77, uc.cross_attention_dim)
        with FlopCounterMode(display=False) as unet_count:
            unet(latents, torch.tensor(500.0), context)
        with FlopCounterMode(display=False) as vae_count:
            vae.decode(torch.empty(1, vc.latent_channels, h, h))
    return {"unet_step": unet_count.get_total_flops(), "vae_decode": vae_count.get_total_flops()}


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Best GFLOP/s of a large square matrix product in `dtype`."""
    n, tries = (8192, 10) if device.type == "cuda" else (4096, 3)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    (a @ b).sum().item()  # warm-up
    best = math.inf
    for _ in range(tries):
        seconds, _ = timed(device, lambda: a @ b)
        best = min(best, seconds)
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the GPU's memory to the workers
    return 2 * n ** 3 / best / 1e9


def timed(device: torch.device, fn):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Worker side: one mode's pipeline in its own process
# --------------------------------------------------------------------------------------------

class CallTimer:
    """Stands in for the UNet (or the VAE) inside a pipeline and times each call the pipeline
    makes, with the pipeline's own arguments: CUDA events on a GPU (nothing waits inside the
    loop), the wall clock on a CPU. Every other attribute is the wrapped module's."""

    def __init__(self, module, device: torch.device):
        self._module, self._cuda, self._marks = module, device.type == "cuda", []

    def __call__(self, *args, **kwargs):  # the UNet: unet(latents, t, context)
        return self._timed(self._module, *args, **kwargs)

    def decode(self, *args, **kwargs):  # the VAE: vae.decode(latents)
        return self._timed(self._module.decode, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)

    def _timed(self, fn, *args, **kwargs):
        if self._cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self._marks.append((start, end))
        else:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self._marks.append(time.perf_counter() - start)
        return out

    def take(self) -> list[float]:
        """Seconds of each call since the last take."""
        if self._cuda:
            torch.cuda.synchronize()
            seconds = [start.elapsed_time(end) / 1e3 for start, end in self._marks]
        else:
            seconds = list(self._marks)
        self._marks.clear()
        return seconds


class Session:
    """A loaded pipeline, and one image timed on it: end to end, each UNet step, the VAE decode."""

    def __init__(self, spec: dict):
        self.spec, self.mode = spec, Mode.parse(spec["mode"])
        self.device, dtype = torch.device(spec["device"]), DTYPES[self.mode.dtype]
        self.note = ""
        if self.device.type == "cuda":  # start CUDA outside the load time
            torch.zeros(1, device=self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        # Imports are timed apart: load time is from_pretrained (and the compile setup) alone.
        self.import_s, pipeline_cls = timed(self.device, self._import)
        load = self._load_diffusers if self.mode.lib == "diffusers" else self._load_minisd
        self.load_s, self.pipe = timed(self.device, lambda: load(pipeline_cls, Path(spec["folder"]), dtype))
        # Plain attribute writes: diffusers' pipeline __setattr__ would re-register the components.
        self.unet, self.vae = CallTimer(self.pipe.unet, self.device), CallTimer(self.pipe.vae, self.device)
        object.__setattr__(self.pipe, "unet", self.unet)
        object.__setattr__(self.pipe, "vae", self.vae)

    def _import(self):
        if self.mode.lib == "minisd":
            import logging

            from minisd import Pipeline

            logging.getLogger("minisd").setLevel(logging.ERROR)  # the safety-checker opt-out warning
            return Pipeline
        import diffusers
        import transformers

        for library in (diffusers, transformers):
            library.utils.logging.disable_progress_bar()
        return diffusers.StableDiffusionPipeline

    def _load_diffusers(self, pipeline_cls, folder: Path, dtype: torch.dtype):
        import importlib.util

        pipe = pipeline_cls.from_pretrained(folder, dtype=dtype, safety_checker=None,
                                            requires_safety_checker=False).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if importlib.util.find_spec("accelerate") is None:
            # diffusers then builds each model with random init before loading the weights.
            self.note = "accelerate not installed: diffusers loads with low_cpu_mem_usage=False"
        if self.mode.compiled:
            pipe.fuse_qkv_projections()
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            pipe.unet = torch.compile(pipe.unet, mode=self.spec["diffusers_compile_mode"])
            self.note = ", ".join(filter(None, [self.note, "fused QKV, channels_last, "
                                                f"compile(mode={self.spec['diffusers_compile_mode']!r})"]))
        return pipe

    def _load_minisd(self, pipeline_cls, folder: Path, dtype: torch.dtype):
        import inspect

        option = self.spec["minisd_compile"] if self.mode.compiled else False
        has_compile = "compile" in inspect.signature(pipeline_cls.from_pretrained).parameters
        kwargs = {"compile": option} if option is not False and has_compile else {}
        pipe = pipeline_cls.from_pretrained(folder, device=self.device, dtype=dtype, safety_checker=None, **kwargs)
        if option is not False and not has_compile:
            # Until minisd's own compile= lands: compile the UNet here, and say so.
            pipe.unet = torch.compile(pipe.unet, mode=None if option is True else option)
            self.note = "no compile= in minisd yet: bench compiled the UNet"
        elif option is not False:
            self.note = f"compile={option!r}"
        return pipe

    @torch.no_grad()
    def image(self) -> dict:
        s = self.spec
        e2e_s, images = timed(self.device, lambda: self.pipe(
            PROMPT, height=s["size"], width=s["size"], num_inference_steps=s["steps"], guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(SEED), output_type="np").images)
        unet_s, vae_s = self.unet.take(), self.vae.take()
        return {"e2e_s": e2e_s, "unet_s": statistics.median(unet_s), "unet_first_s": unet_s[0],
                "vae_s": vae_s[0], "image": images[0]}

    def first(self) -> dict:
        first = self.image()
        return {"import_s": self.import_s, "load_s": self.load_s, "first_image_s": first["e2e_s"],
                "first_unet_s": first["unet_first_s"], "first_vae_s": first["vae_s"], "image": first["image"],
                "peak_mem_first": self.peak_memory(), "note": self.note}

    def rep(self) -> dict:
        out = self.image()
        return {key: out[key] for key in ("e2e_s", "unet_s", "vae_s")}

    def peak_memory(self) -> int:
        """Bytes: the CUDA allocator's peak on a GPU, else this process's peak RSS."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            status = Path("/proc/self/status").read_text()
            return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) * 1024
        except (OSError, TypeError):
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux

    def close(self) -> dict:
        return {"peak_mem": self.peak_memory()}


def worker_main(conn, spec: dict) -> None:
    """Serve commands from the parent: load, first, rep, close. Errors go back as text."""
    if spec["compile_cache"]:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = spec["compile_cache"]
    session = None
    while True:
        try:
            cmd = conn.recv()
        except EOFError:  # the parent is gone
            return
        try:
            if cmd == "load":
                session = Session(spec)
                conn.send({})
            else:
                conn.send(getattr(session, cmd)())
        except Exception:
            conn.send({"error": traceback.format_exc()})
        if cmd == "close":
            return


# --------------------------------------------------------------------------------------------
# Parent side: workers, groups, alternation
# --------------------------------------------------------------------------------------------

class WorkerError(RuntimeError):
    pass


class Worker:
    def __init__(self, spec: dict):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.compile_cache = spec["compile_cache"]
        self.proc = ctx.Process(target=worker_main, args=(child, spec), name=spec["mode"])
        self.proc.start()
        child.close()

    def call(self, cmd: str) -> dict:
        try:
            self.conn.send(cmd)
            reply = self.conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            self.proc.join(10)
            raise WorkerError(f"worker died (exit code {self.proc.exitcode})") from None
        if "error" in reply:
            raise WorkerError(reply["error"].rstrip())
        return reply

    def close(self) -> dict:
        """End the worker; its last numbers (peak memory) when it could still answer."""
        try:
            return self.call("close")
        except WorkerError:
            return {}
        finally:
            self.stop()

    def stop(self) -> None:
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        if self.compile_cache:
            shutil.rmtree(self.compile_cache, ignore_errors=True)


def run_group(modes: list[Mode], args, folder: Path, results: dict, deadline: float, save) -> None:
    """Load each mode and make its first image, then alternate repetitions across the group."""
    workers: dict[Mode, Worker] = {}
    try:
        for mode in modes:
            r = results[mode.name]
            if time.perf_counter() > deadline:
                r["error"] = "skipped: --time-limit reached"
                log(f"{mode.name}: {r['error']}")
                continue
            spec = {"mode": mode.name, "folder": str(folder), "device": args.device, "size": args.size,
                    "steps": args.steps, "minisd_compile": args.minisd_compile,
                    "diffusers_compile_mode": args.diffusers_compile_mode,
                    "compile_cache": None if args.warm_compile_cache else tempfile.mkdtemp(prefix="bench-inductor-")}
            worker = Worker(spec)
            try:
                log(f"{mode.name}: loading")
                worker.call("load")
                log(f"{mode.name}: first image")
                first = worker.call("first")
            except WorkerError as e:
                r["error"] = str(e)
                log(f"{mode.name}: FAILED\n{e}")
                worker.close()
                continue
            r["image"] = first.pop("image")
            r.update(first)
            log(f"{mode.name}: load {first['load_s']:.1f}s, first image {first['first_image_s']:.1f}s")
            workers[mode] = worker
            save()

        live = list(workers)
        last_rep_s = 0.0
        for rep in range(args.repeats):
            now = time.perf_counter()
            if rep > 0 and now + last_rep_s > deadline:
                log(f"--time-limit: stopping this group after {rep} repetition(s)")
                break
            order = live[rep % len(live):] + live[:rep % len(live)] if live else []
            for mode in order:
                time.sleep(0.2)  # let the last worker's threads go idle
                try:
                    out = workers[mode].call("rep")
                except WorkerError as e:
                    results[mode.name]["error"] = str(e)
                    log(f"{mode.name}: FAILED\n{e}")
                    live.remove(mode)
                    continue
                for key, value in out.items():
                    results[mode.name].setdefault(key + "_all", []).append(value)
                log(f"rep {rep + 1}/{args.repeats} {mode.name}: {out['e2e_s']:.2f} s/image, "
                    f"UNet {out['unet_s'] * 1e3:.0f} ms, VAE {out['vae_s'] * 1e3:.0f} ms")
            last_rep_s = time.perf_counter() - now
            save()
    finally:
        for mode, worker in workers.items():
            results[mode.name].update(worker.close())


def group_modes(modes: list[Mode], group_by: str) -> list[list[Mode]]:
    if group_by == "none":
        return [sorted(modes, key=Mode.sort_key)]
    if group_by == "mode":
        return [[m] for m in sorted(modes, key=Mode.sort_key)]
    dtypes = sorted({m.dtype for m in modes}, key=lambda d: d != "fp32")
    return [sorted((m for m in modes if m.dtype == d), key=Mode.sort_key) for d in dtypes]


# --------------------------------------------------------------------------------------------
# Numbers: medians, ratios, GFLOP/s, PSNR
# --------------------------------------------------------------------------------------------

def psnr(a, b) -> float:
    """dB between two images in [0, 1]; inf when identical, nan when either is not finite."""
    mse = float(((a.astype("float64") - b.astype("float64")) ** 2).mean())
    if not math.isfinite(mse):
        return math.nan
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def summarize(results: dict, flops: dict, peaks: dict, steps: int) -> dict:
    for name, r in results.items():
        for key in ("e2e_s", "unet_s", "vae_s"):
            if r.get(key + "_all"):
                r[key] = statistics.median(r[key + "_all"])
        mode = Mode.parse(name)
        if "load_s" in r and "first_image_s" in r:
            # What a one-off run waits for: a loader that defers reading the weights (diffusers
            # maps the file) pays for it in the first image instead.
            r["to_first_image_s"] = r["load_s"] + r["first_image_s"]
        if "e2e_s" in r:
            if mode.compiled:
                r["compile_s"] = r["first_image_s"] - r["e2e_s"]
            r["unet_gflops"] = flops["unet_step"] / r["unet_s"] / 1e9
            r["unet_pct_peak"] = 100 * r["unet_gflops"] / peaks[mode.dtype]
            r["vae_gflops"] = flops["vae_decode"] / r["vae_s"] / 1e9
            r["e2e_gflops"] = (steps * flops["unet_step"] + flops["vae_decode"]) / r["e2e_s"] / 1e9

    def e2e(name):
        return results.get(name, {}).get("e2e_s")

    base = e2e("diffusers-fp32")
    diffusers_times = {n: r["e2e_s"] for n, r in results.items() if n.startswith("diffusers-") and "e2e_s" in r}
    best = min(diffusers_times, key=diffusers_times.get) if diffusers_times else None
    for name, r in results.items():
        if "e2e_s" in r:
            r["ratio_vs_diffusers_fp32"] = r["e2e_s"] / base if base else None
            r["ratio_vs_diffusers_best"] = r["e2e_s"] / diffusers_times[best] if best else None
        for ref in ("diffusers-fp32", "minisd-fp32"):
            if "image" in r and "image" in results.get(ref, {}):
                r[f"psnr_vs_{ref}"] = psnr(r["image"], results[ref]["image"])
    return {"diffusers_best": best, "parity": parity_checks(results)}


def parity_checks(results: dict) -> list[dict]:
    def p(name, ref="diffusers-fp32"):
        return results.get(name, {}).get(f"psnr_vs_{ref}")

    checks = []
    if p("minisd-fp32") is not None:
        # On CUDA, "fp32" convolutions run in TF32 (PyTorch's default), about as precise as
        # fp16: there the bar is diffusers' own half-precision distance, if that is lower.
        half_refs = [v for v in (p("diffusers-bf16"), p("diffusers-fp16")) if v is not None]
        need = min(FP32_MIN_PSNR_DB, max(half_refs, default=math.inf))
        checks.append({"check": "minisd-fp32 vs diffusers-fp32", "psnr_db": p("minisd-fp32"),
                       "need_db": need, "ok": p("minisd-fp32") >= need})
    for half in ("bf16", "fp16"):
        ours, theirs = p(f"minisd-{half}"), p(f"diffusers-{half}")
        if ours is not None and theirs is not None:
            need = theirs - HALF_MARGIN_DB
            checks.append({"check": f"minisd-{half} vs diffusers-fp32", "psnr_db": ours,
                           "need_db": need, "reference": f"diffusers-{half} vs diffusers-fp32: {theirs:.1f} dB",
                           "ok": ours >= need or (math.isinf(ours) and math.isinf(theirs))})
    return checks


def fmt(value, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # inf, nan
    return format(value * scale, spec)


def print_table(results: dict, summary: dict, meta: dict) -> None:
    cuda = meta["device"] == "cuda"
    mem_label = "GPU peak" if cuda else "peak RSS"
    cols = [("mode", "<24"), ("s/image", ">8"), ("/d-fp32", ">7"), ("/d-best", ">7"), ("UNet ms", ">8"),
            ("GFLOP/s", ">8"), ("%peak", ">6"), ("VAE ms", ">8"), ("load s", ">7"), ("1st img s", ">9"),
            ("compile s", ">9"),
            (mem_label + " GB", ">11"), ("PSNR d32", ">8"), ("PSNR m32", ">8")]
    done = sorted({len(r.get("e2e_s_all", [])) for r in results.values()} - {0}) or [0]
    runs = str(done[0]) if len(done) == 1 else f"{done[0]}-{done[-1]}"
    print(f"\n{meta['size']}x{meta['size']}, {meta['steps']} steps, CFG {GUIDANCE}, {meta['device']} "
          f"({meta['device_name']}), medians of {runs} repetition(s); torch {meta['torch']}, "
          f"diffusers {meta['diffusers']}")
    print(f"FLOPs: CFG UNet step {meta['flops']['unet_step'] / 1e9:.1f} G, VAE decode "
          f"{meta['flops']['vae_decode'] / 1e9:.1f} G; matmul peak "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in meta["matmul_peak_gflops"].items()))
    print("  ".join(format(name, spec) for name, spec in cols))
    for name, r in sorted(results.items(), key=lambda item: Mode.parse(item[0]).table_key()):
        row = [name, fmt(r.get("e2e_s"), ".2f"), fmt(r.get("ratio_vs_diffusers_fp32"), ".2f"),
               fmt(r.get("ratio_vs_diffusers_best"), ".2f"), fmt(r.get("unet_s"), ".0f", 1e3),
               fmt(r.get("unet_gflops"), ".0f"), fmt(r.get("unet_pct_peak"), ".0f"),
               fmt(r.get("vae_s"), ".0f", 1e3), fmt(r.get("load_s"), ".1f"),
               fmt(r.get("to_first_image_s"), ".1f"), fmt(r.get("compile_s"), ".1f"),
               fmt(r.get("peak_mem", r.get("peak_mem_first")), ".2f", 1 / 2 ** 30),
               fmt(r.get("psnr_vs_diffusers-fp32"), ".1f"), fmt(r.get("psnr_vs_minisd-fp32"), ".1f")]
        if "error" in r:
            row[1] = "ERROR" if "e2e_s" not in r else row[1]
        print("  ".join(format(v, spec) for v, (_, spec) in zip(row, cols)))
    print(f"/d-fp32, /d-best: s/image over diffusers-fp32's and over the fastest diffusers mode's "
          f"({summary['diffusers_best'] or '-'}). GFLOP/s, %peak: the UNet step against the "
          f"mode's dtype matmul peak. 1st img: load + first image (compile included). PSNR dB vs "
          f"diffusers-fp32 (d32) and minisd-fp32 (m32).")
    for name, r in results.items():
        if r.get("note"):
            print(f"  {name}: {r['note']}")
        if "error" in r:
            print(f"  {name}: {r['error'].splitlines()[-1]}")
    for c in summary["parity"]:
        extra = f" ({c['reference']})" if "reference" in c else ""
        print(f"parity {'PASS' if c['ok'] else 'FAIL'}: {c['check']} {fmt(c['psnr_db'], '.1f')} dB, "
              f"need >= {c['need_db']:.1f}{extra}")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", cpuinfo)[1]
    except (OSError, TypeError):
        model = platform.processor() or "CPU"
    return f"{model}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", type=int, default=256, help="image height and width (default 256)")
    p.add_argument("--steps", type=int, default=10, help="DPM-Solver++ steps (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per mode (default 3)")
    p.add_argument("--modes", help="comma-separated LIB-DTYPE[-compiled] (default: see the docstring)")
    p.add_argument("--diffusers-compiled", action="store_true",
                   help="add diffusers' compiled half-precision mode to the default modes")
    p.add_argument("--minisd-compile", default="auto",
                   help="compile= for minisd's compiled modes: auto (True) or a torch.compile mode")
    p.add_argument("--diffusers-compile-mode", help="torch.compile mode of diffusers' compiled modes "
                   "(default: reduce-overhead on cuda, default on cpu)")
    p.add_argument("--group-by", choices=["dtype", "none", "mode"],
                   help="which modes are loaded and alternated together (default: dtype on cpu, none on cuda)")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="use inductor's usual on-disk cache (default: an empty one per mode: cold compile times)")
    p.add_argument("--time-limit", type=float, help="seconds: stop repeating (and skip modes not yet "
                   "started) past this; at least one repetition of each started mode runs")
    p.add_argument("--tiny", action="store_true", help="make_tiny_checkpoint's tiny model instead of small-sd")
    p.add_argument("--seed", type=int, default=0, help="weights seed of the random model")
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".cache")
    p.add_argument("--json", type=Path, help="write every number here (updated as the run goes)")
    args = p.parse_args(argv)

    if args.size % 8 or args.size <= 0:
        p.error("--size must be a positive multiple of 8")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    modes = ([Mode.parse(m) for m in args.modes.split(",") if m.strip()] if args.modes
             else default_modes(args.device, args.diffusers_compiled))
    modes = list(dict.fromkeys(modes))
    args.minisd_compile = True if args.minisd_compile == "auto" else args.minisd_compile
    args.diffusers_compile_mode = args.diffusers_compile_mode or (
        "reduce-overhead" if args.device == "cuda" else "default")
    args.group_by = args.group_by or ("none" if args.device == "cuda" else "dtype")
    for key, value in {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)  # the workers inherit these

    import minisd

    folder = model_folder(args.cache_dir, args.tiny, args.seed)
    device = torch.device(args.device)
    flops = count_flops(folder, args.size)
    peaks, peak_samples = {}, {}

    def measure_peaks():  # before and after each group; the best counts (a shared CPU varies)
        for dtype in sorted({m.dtype for m in modes}, key=list(DTYPES).index):
            gflops = matmul_peak(device, DTYPES[dtype])
            peak_samples.setdefault(dtype, []).append(gflops)
            peaks[dtype] = max(peak_samples[dtype])
            log(f"matmul peak {dtype}: {gflops:.0f} GFLOP/s")

    measure_peaks()
    meta = {"device": args.device, "device_name": device_name(device), "size": args.size, "steps": args.steps,
            "guidance_scale": GUIDANCE, "repeats": args.repeats, "prompt": PROMPT, "seed": SEED,
            "model": str(folder), "tiny": args.tiny, "group_by": args.group_by,
            "torch": torch.__version__, "diffusers": _version("diffusers"),
            "transformers": _version("transformers"), "minisd": minisd.__version__,
            "python": platform.python_version(), "flops": flops, "matmul_peak_gflops": peaks,
            "matmul_peak_samples": peak_samples}
    results = {m.name: {} for m in sorted(modes, key=Mode.sort_key)}

    def save(summary=None):
        if args.json:
            summary = summary or summarize(results, flops, peaks, args.steps)
            payload = {"meta": meta, "summary": summary,
                       "modes": {n: {k: v for k, v in r.items() if k != "image"} for n, r in results.items()}}
            tmp = args.json.with_name(args.json.name + ".tmp")
            tmp.write_text(json.dumps(_finite(payload), indent=2, allow_nan=False, default=str) + "\n")
            tmp.replace(args.json)

    deadline = START + args.time_limit if args.time_limit else math.inf
    groups = group_modes(modes, args.group_by)
    for i, group in enumerate(groups):
        now = time.perf_counter()
        share = now + (deadline - now) / (len(groups) - i)  # the time left, split over the groups left
        log(f"group {i + 1}/{len(groups)}: {', '.join(m.name for m in group)}")
        run_group(group, args, folder, results, share, save)
        measure_peaks()

    summary = summarize(results, flops, peaks, args.steps)
    save(summary)
    print_table(results, summary, meta)
    failed = any("error" in r for r in results.values()) or not all(c["ok"] for c in summary["parity"])
    return 1 if failed else 0


def _finite(obj):
    """JSON has no inf/nan: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
