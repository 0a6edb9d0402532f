"""One benchmark mode in a process of its own: tools/bench.py's workers.

Every mode lives in its own worker process (spawned, so no state is shared): its load time,
peak memory (CPU: the process's VmHWM; CUDA: torch.cuda.max_memory_allocated) and compile
time are its own.

- Load time is `from_pretrained` (plus moving to the device and the compile recipe's setup),
  disk to ready, with the page cache warm after the first load; the library's import time is
  apart (`import_s`). diffusers maps the weights file and reads it during the first image;
  minisd reads what it converts (dtype, channels-last) at load, hence bench's "1st img" column:
  load + first image, what a one-off run waits for.
- Warm-up: each worker generates one image right after loading (its "first image": this is
  where torch.compile compiles, each worker with its own empty inductor cache and minisd
  package cache unless `--warm-compile-cache`); compile time = first image - median steady image.
- UNet step and VAE decode are timed inside each image, around the calls the pipeline makes
  (the UNet and VAE are wrapped by `CallTimer`; CUDA events on a GPU, so nothing waits inside
  the loop): a step is the median of the image's CFG UNet calls (batch 2), the decode its one
  VAE decode. Calling the modules directly instead would time other code than the pipeline
  runs (minisd computes the cross-attention K/V once per image) and recompile the compiled modes.

The spec a worker gets is plain data: the mode's name, `lib` (diffusers, minisd or openvino),
`dtype`, `compiled`, `minisd_from`: a checkout whose minisd a baseline worker imports
instead of the installed one, and `minisd_in_process` (`--minisd-in-process`): minisd's
compiled and int8 UNets compiled in the worker with `compile_cache=False` rather than
packaged. The parent drives a worker through `Worker`: load, first, rep, close.

dtype int8: the UNet in int8 (weights and activations, static scales), the rest in bf16 (the
text encoder as each library runs it). minisd: `from_pretrained(dtype=bfloat16,
quantize="int8", compile=...)` (always compiled: `--minisd-compile`); a minisd without
`quantize=` fails the mode rather than run bf16 under the int8 name. openvino (bf16 or int8):
diffusers' pipeline with an OpenVINO UNet and VAE decoder, built by tools/bench_openvino.py.
"""
from __future__ import annotations

import importlib.util
import inspect
import math
import multiprocessing
import os
import re
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from bench_model import DTYPES, GUIDANCE, PROMPT, SEED, timed


# --- the worker's side ---------------------------------------------------------------------

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

    @property
    def __class__(self):
        # isinstance() then sees the wrapped module's class (unittest.mock's trick): minisd's
        # pipeline checks isinstance(self.unet, Int8UNet) to calibrate before a first image.
        return type(self._module)

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
        self.spec = spec
        self.device = torch.device(spec["device"])
        # int8 modes load everything but the UNet in bf16 (the UNet's int8 is the quantizer's).
        dtype = torch.bfloat16 if spec["dtype"] == "int8" else DTYPES[spec["dtype"]]
        self.notes: list[str] = []  # how this mode ran, shown under the table
        self.call_kwargs: dict = {}  # extra arguments of each pipeline call (`use`), e.g. step skipping
        if self.device.type == "cuda":  # start CUDA outside the load time
            torch.zeros(1, device=self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        # Imports are timed apart: load time is from_pretrained (and the compile setup) alone.
        self.import_s, pipeline_cls = timed(self.device, self._import)
        load = {"diffusers": self._load_diffusers, "minisd": self._load_minisd,
                "openvino": self._load_openvino}[spec["lib"]]
        self.load_s, self.pipe = timed(self.device, lambda: load(pipeline_cls, Path(spec["folder"]), dtype))
        # Plain attribute writes: diffusers' pipeline __setattr__ would re-register the components.
        self.unet, self.vae = CallTimer(self.pipe.unet, self.device), CallTimer(self.pipe.vae, self.device)
        if spec.get("time_calls", True):  # tools/frontier.py times whole images only: its UNet stays as loaded
            object.__setattr__(self.pipe, "unet", self.unet)  # (minisd's compiled step skipping traces the UNet)
            object.__setattr__(self.pipe, "vae", self.vae)

    def _import(self):
        # Each library is imported here, in the worker that runs it, never at the top: every
        # worker re-imports bench.py's modules, and a minisd worker must not carry diffusers.
        if self.spec["lib"] == "minisd":
            import logging

            self._find_minisd()
            from minisd import Pipeline

            logging.getLogger("minisd").setLevel(logging.ERROR)  # the safety-checker opt-out warning
            return Pipeline
        import diffusers
        import transformers

        for library in (diffusers, transformers):
            library.utils.logging.disable_progress_bar()
        if self.spec["lib"] == "openvino":  # fail here, before any loading, when it is missing
            from bench_openvino import import_openvino

            import_openvino(int8=self.spec["dtype"] == "int8")
        return diffusers.StableDiffusionPipeline

    def _find_minisd(self) -> None:
        """Put a baseline's checkout first on sys.path, so `import minisd` finds its package, not
        this checkout's (an editable install's finder comes after sys.path)."""
        checkout = self.spec["minisd_from"]
        if checkout is None:
            return
        if "minisd" in sys.modules:
            raise RuntimeError(f"minisd was imported before the baseline's ({sys.modules['minisd'].__file__})")
        sys.path.insert(0, checkout)
        import minisd

        where = Path(minisd.__file__).resolve().parent
        if where != Path(checkout).resolve() / "minisd":
            raise RuntimeError(f"--baseline {checkout}: imported minisd from {where} instead")
        self.notes.append(f"minisd from {checkout}")

    def _load_diffusers(self, pipeline_cls, folder: Path, dtype: torch.dtype):
        pipe = pipeline_cls.from_pretrained(folder, dtype=dtype, safety_checker=None,
                                            requires_safety_checker=False).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if importlib.util.find_spec("accelerate") is None:
            # diffusers then builds each model with random init before loading the weights.
            self.notes.append("accelerate not installed: diffusers loads with low_cpu_mem_usage=False")
        if self.spec["compiled"]:
            pipe.fuse_qkv_projections()
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            pipe.unet = torch.compile(pipe.unet, mode=self.spec["diffusers_compile_mode"])
            self.notes.append(f"fused QKV, channels_last, compile(mode={self.spec['diffusers_compile_mode']!r})")
        if self.spec.get("addon"):  # before CallTimer wraps the UNet: the add-ons patch its forward
            pipe = apply_addon(pipe, self.spec["addon"], self.notes)
        return pipe

    def _load_openvino(self, pipeline_cls, folder: Path, dtype: torch.dtype):
        from bench_openvino import load_openvino_pipeline

        s = self.spec
        return load_openvino_pipeline(pipeline_cls, folder, s["size"], s["steps"], GUIDANCE,
                                      int8=s["dtype"] == "int8", notes=self.notes)

    def _load_minisd(self, pipeline_cls, folder: Path, dtype: torch.dtype):
        int8 = self.spec["dtype"] == "int8"  # bench marks minisd-int8 compiled: PT2E's int8 kernels are inductor's
        option = self.spec["minisd_compile"] if self.spec["compiled"] else False
        parameters = inspect.signature(pipeline_cls.from_pretrained).parameters
        has_compile = "compile" in parameters
        kwargs = {"compile": option} if option is not False and has_compile else {}
        if int8:
            if "quantize" not in parameters:
                raise WorkerError("this minisd has no quantize= in Pipeline.from_pretrained: "
                                  "minisd-int8 would run bf16, so it does not run")
            kwargs["quantize"] = "int8"
            # minisd calibrates on the first image of a size, so its compile s includes that.
            self.notes.append("quantize='int8' (calibrated and compiled in the first image)")
        if self.spec.get("minisd_in_process") and kwargs:
            if "compile_cache" not in parameters:
                raise WorkerError("--minisd-in-process: this minisd has no compile_cache= in Pipeline.from_pretrained")
            kwargs["compile_cache"] = False
            self.notes.append("compiled in process (compile_cache=False)")
        pipe = pipeline_cls.from_pretrained(folder, device=self.device, dtype=dtype, safety_checker=None, **kwargs)
        if option is not False and not has_compile:
            # Until minisd's own compile= lands: compile the UNet here, and say so.
            pipe.unet = torch.compile(pipe.unet, mode=None if option is True else option)
            self.notes.append("no compile= in this minisd: bench compiled the UNet")
        elif option is not False:
            self.notes.append(f"compile={option!r}")
        return pipe

    @torch.no_grad()
    def image(self) -> dict:
        s = self.spec
        call = getattr(self.pipe, (s.get("addon") or {}).get("call", "__call__"))  # tgate: pipe.tgate
        e2e_s, images = timed(self.device, lambda: call(
            PROMPT, height=s["size"], width=s["size"], num_inference_steps=s["steps"], guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(SEED), output_type="np", **self.call_kwargs).images)
        unet_s, vae_s = self.unet.take(), self.vae.take()
        # Nothing timed: the calls were not wrapped (spec time_calls False), or minisd's step skipping
        # ran the UNet's layers through its SkippingUNet rather than the timed call.
        unet_s, vae_s = unet_s or [math.nan], vae_s or [math.nan]
        return {"e2e_s": e2e_s, "unet_s": statistics.median(unet_s), "unet_first_s": unet_s[0],
                "vae_s": vae_s[0], "image": images[0]}

    def use(self, call_kwargs: dict) -> dict:
        """Pass `call_kwargs` to every later pipeline call (one pipeline, several settings)."""
        self.call_kwargs = dict(call_kwargs)
        return {}

    def first(self) -> dict:
        first = self.image()
        return {"import_s": self.import_s, "load_s": self.load_s, "first_image_s": first["e2e_s"],
                "first_unet_s": first["unet_first_s"], "first_vae_s": first["vae_s"], "image": first["image"],
                "peak_mem_first": self.peak_memory(), "note": "; ".join(self.notes)}

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


def apply_addon(pipe, addon: dict, notes: list[str]):
    """diffusers with a step-skipping add-on package: {"name": "deepcache", "cache_interval": N,
    "cache_branch_id": B}, {"name": "tgate", "call": "tgate"} (its settings go in each call), or
    {"name": "tgate-deepcache", "call": "tgate", "cache_interval": N, "cache_branch_id": B}."""
    if addon["name"] == "deepcache":
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=addon["cache_interval"], cache_branch_id=addon["cache_branch_id"])
        helper.enable()
        pipe._deepcache_helper = helper  # kept alive with the pipeline
    elif addon["name"] == "tgate":
        from tgate import TgateSDLoader

        pipe = TgateSDLoader(pipe)
    elif addon["name"] == "tgate-deepcache":
        from tgate import TgateSDDeepCacheLoader

        pipe = TgateSDDeepCacheLoader(pipe, cache_interval=addon["cache_interval"],
                                      cache_branch_id=addon["cache_branch_id"])
    else:
        raise WorkerError(f"unknown add-on {addon['name']!r}")
    notes.append(f"add-on {addon['name']}")
    return pipe


def worker_main(conn, spec: dict) -> None:
    """Serve commands from the parent: load, first, rep, close. Errors go back as text."""
    if spec["compile_cache"]:  # cold: Inductor's cache and minisd's packages (compile_cache.py) start empty
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = spec["compile_cache"]
        os.environ["MINISD_COMPILE_CACHE"] = os.path.join(spec["compile_cache"], "minisd")
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
                name, *args = cmd if isinstance(cmd, tuple) else (cmd,)
                conn.send(getattr(session, name)(*args))
        except Exception:
            conn.send({"error": traceback.format_exc()})
        if cmd == "close":
            return


# --- the parent's side ---------------------------------------------------------------------

class WorkerError(RuntimeError):
    """A worker's command failed (the text is its traceback) or the worker died."""


class Worker:
    """The parent's handle on one worker process: `call("load")`, then "first", "rep"s, `close()`."""

    def __init__(self, spec: dict):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.compile_cache = spec["compile_cache"]
        self.proc = ctx.Process(target=worker_main, args=(child, spec), name=spec["mode"])
        self.proc.start()
        child.close()

    def call(self, cmd: str, *args) -> dict:
        try:
            self.conn.send((cmd, *args) if args else cmd)
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
