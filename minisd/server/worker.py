"""The one queue: every request, from the web UI or the API, waits its turn for the model.

    submit(Request) -> Job          checked first (limits, types), then queued
    worker thread: Job by Job       Pipeline calls, one per n_iter batch, seeds seed, seed+1, ...
    Job.wait() / Job.cancel()       a client that leaves cancels its job (at the next step)
    progress()                      what /sdapi/v1/progress and the UI's progress bar show

One thread owns the Pipeline, so generations never overlap on the device and a Pipeline is
never used by two threads at once (it keeps per-generation state: the scheduler, the cached
text keys and values).
"""
from __future__ import annotations

import itertools
import math
import queue
import random
import threading
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..errors import InputError
from ..img2img import check_strength
from ..pipeline import Pipeline
from ..pnginfo import generation_parameters
from ..runtime import MAX_SEED
from ..text_conditioning import PROMPT_SYNTAXES


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (`minisd serve --max-size --max-steps --max-images`)."""
    max_width: int
    max_height: int
    max_steps: int = 150
    max_images: int = 8


@dataclass
class Request:
    """One generation request, in AUTOMATIC1111's terms (its API's field names)."""
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1  # -1: a random seed, reported in the result
    width: int | None = None  # None: the model's native size, or the init image's in img2img
    height: int | None = None
    batch_size: int = 1  # images per Pipeline call
    n_iter: int = 1  # Pipeline calls
    clip_skip: int = 1  # A1111's numbering: 1 = the last layer
    init_images: list[Image.Image] | None = None  # img2img when given
    denoising_strength: float = 0.75
    prompt_syntax: str = "a1111"
    sampler_name: str | None = None

    @property
    def count(self) -> int:
        return self.batch_size * self.n_iter


@dataclass
class Result:
    images: list[Image.Image]
    seeds: list[int]  # one per image
    infotexts: list[str]  # each image's PNG `parameters` text
    nsfw: list[bool]  # True: blacked out by the safety checker
    warnings: list[str]
    width: int
    height: int


class RequestError(InputError):
    """A request field that cannot be served; `field` names it (the API answers 422 with it)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class Cancelled(Exception):
    """The job's client went away; raised from the step callback to stop the generation."""


def _integer(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(name, f"must be an integer from {low} to {high}, got {value!r:.60}")
    return value


def _number(value, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise RequestError(name, f"must be a number from {low:g} to {high:g}, got {value!r:.60}")
    return float(value)


def check_request(request: Request, limits: Limits, pipe: Pipeline) -> list[str]:
    """Refuse what this server will not run, naming the field; return warnings (A1111 warns
    rather than fails on a sampler it does not have)."""
    for name in ("prompt", "negative_prompt"):
        if not isinstance(getattr(request, name), str):
            raise RequestError(name, f"must be a string, got {type(getattr(request, name)).__name__}")
    _integer(request.steps, "steps", 1, limits.max_steps)
    _number(request.cfg_scale, "cfg_scale", 0.0, 100.0)
    _integer(request.batch_size, "batch_size", 1, limits.max_images)
    _integer(request.n_iter, "n_iter", 1, limits.max_images)
    if request.count > limits.max_images:
        raise RequestError("batch_size", f"batch_size x n_iter = {request.count} images; this server makes "
                                         f"at most {limits.max_images} per request")
    if request.seed != -1:
        _integer(request.seed, "seed", -1, MAX_SEED - request.count)
    layers = pipe.text_encoder.config.num_hidden_layers
    _integer(request.clip_skip, "clip_skip", 1, layers + 1)
    if request.prompt_syntax not in PROMPT_SYNTAXES:
        raise RequestError("prompt_syntax", f"must be one of {', '.join(PROMPT_SYNTAXES)}, got {request.prompt_syntax!r:.60}")
    width, height = output_size(request, pipe)
    f = pipe.vae.downscale_factor
    for name, value, most in (("width", width, limits.max_width), ("height", height, limits.max_height)):
        if getattr(request, name) is not None:
            _integer(value, name, f, most)
            if value % f:
                raise RequestError(name, f"must be a multiple of {f}, got {value}")
        elif value > most:  # the init image's own size
            raise RequestError("init_images", f"the image is {width}x{height}, over this server's limit of "
                                              f"{limits.max_width}x{limits.max_height}; give width and height to resize it")
    if request.init_images is not None:
        if not request.init_images or not all(isinstance(im, Image.Image) for im in request.init_images):
            raise RequestError("init_images", "must be a non-empty list of images")
        if min(width, height) < f:
            raise RequestError("init_images", f"the image is {width}x{height}; at least {f}x{f} pixels are needed")
        _number(request.denoising_strength, "denoising_strength", 0.0, 1.0)
        try:
            check_strength(request.denoising_strength, request.steps, pipe.scheduler.config.num_train_timesteps)
        except InputError as e:
            raise RequestError("denoising_strength", str(e).removeprefix("strength: ")) from None
    warnings = []
    if request.sampler_name not in (None, "", pipe.scheduler.sampler_name):
        warnings.append(f"sampler_name {request.sampler_name!r} is not available; used {pipe.scheduler.sampler_name}")
    if request.init_images is not None and len(request.init_images) > 1:
        warnings.append(f"{len(request.init_images)} init_images given; the first is used for every image")
    return warnings


def output_size(request: Request, pipe: Pipeline) -> tuple[int, int]:
    """(width, height) of the images the request gets."""
    native = pipe.unet.config.sample_size * pipe.vae.downscale_factor
    if request.init_images:
        first = request.init_images[0]
        return request.width or first.width, request.height or first.height
    return request.width or native, request.height or native


@dataclass
class Job:
    request: Request
    warnings: list[str]
    seed: int
    number: int  # order of arrival
    state: str = "queued"  # queued, running, done, failed, cancelled
    iteration: int = 0  # the current Pipeline call, of request.n_iter
    step: int = 0  # steps done in the current call
    steps: int = 1  # steps each call runs (fewer than request.steps in img2img)
    started: float | None = None
    result: Result | None = None
    error: Exception | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def cancel(self) -> None:
        """Drop the job if it waits; stop it at its next step if it runs."""
        self.cancelled = True

    @property
    def fraction(self) -> float:
        return min(1.0, (self.iteration + self.step / self.steps) / self.request.n_iter)


class GenerationQueue:
    """Runs jobs one at a time on a worker thread that owns `pipe`."""

    def __init__(self, pipe: Pipeline, limits: Limits):
        self.pipe, self.limits = pipe, limits
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting: list[Job] = []  # queued jobs, oldest first
        self._current: Job | None = None
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._thread = threading.Thread(target=self._work, name="minisd-generation", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> Job:
        """Check the request (RequestError naming the field), then queue it."""
        warnings = check_request(request, self.limits, self.pipe)
        seed = random.randrange(2**32) if request.seed == -1 else request.seed
        job = Job(request, warnings, seed, next(self._numbers))
        with self._lock:
            self._waiting.append(job)
        self._queue.put(job)
        return job

    def position(self, job: Job) -> int:
        """How many jobs run before this one: 0 when it runs or is next."""
        with self._lock:
            earlier = self._waiting[:self._waiting.index(job)] if job in self._waiting else []
            ahead = sum(not other.cancelled for other in earlier)  # cancelled ones will be skipped
            return ahead + (self._current is not None and job is not self._current and job.state == "queued")

    def progress(self) -> dict:
        """The running job's progress and the queue's length, for /sdapi/v1/progress and the UI."""
        with self._lock:
            job, waiting = self._current, sum(not other.cancelled for other in self._waiting)
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "job": None, "queued": waiting}
        fraction = job.fraction
        elapsed = time.monotonic() - job.started
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        return {"progress": fraction, "eta_relative": eta, "job": job, "queued": waiting}

    def close(self) -> None:
        """Stop after the running job; queued ones are cancelled."""
        with self._lock:
            for job in self._waiting:
                job.cancel()
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                self._waiting.remove(job)
                if job.cancelled:
                    job.state = "cancelled"
                    job.done.set()
                    continue
                self._current, job.state, job.started = job, "running", time.monotonic()
            try:
                job.result = self._generate(job)
                job.state = "done"
            except Cancelled:
                job.state = "cancelled"
            except Exception as e:  # noqa: BLE001 - the job's client gets it; the server keeps serving
                job.error, job.state = e, "failed"
            finally:
                with self._lock:
                    self._current = None
                job.done.set()

    def _generate(self, job: Job) -> Result:
        r, pipe = job.request, self.pipe
        img2img = r.init_images is not None
        width, height = output_size(r, pipe)
        job.steps = r.steps - check_strength(r.denoising_strength, r.steps) if img2img else r.steps
        seeds = [job.seed + i for i in range(r.count)]

        def on_step(_pipe, i, _t, tensors):
            if job.cancelled:
                raise Cancelled
            job.step = i + 1
            return tensors

        images, nsfw = [], []
        for job.iteration in range(r.n_iter):
            job.step = 0
            batch = seeds[job.iteration * r.batch_size:(job.iteration + 1) * r.batch_size]
            out = pipe(r.prompt, negative_prompt=r.negative_prompt, num_inference_steps=r.steps,
                       guidance_scale=r.cfg_scale, num_images_per_prompt=r.batch_size,
                       generator=[torch.Generator().manual_seed(s) for s in batch],
                       height=r.height, width=r.width, clip_skip=r.clip_skip - 1, prompt_syntax=r.prompt_syntax,
                       image=r.init_images[0] if img2img else None,
                       strength=r.denoising_strength if img2img else None, callback_on_step_end=on_step)
            images += out.images
            nsfw += out.nsfw_content_detected or [False] * len(out.images)
        infotexts = [generation_parameters(r.prompt, r.negative_prompt, r.steps, pipe.scheduler.sampler_name,
                                           r.cfg_scale, seed, width, height, pipe.name,
                                           denoising_strength=r.denoising_strength if img2img else None,
                                           clip_skip=r.clip_skip) for seed in seeds]
        return Result(images, seeds, infotexts, nsfw, list(job.warnings), width, height)
