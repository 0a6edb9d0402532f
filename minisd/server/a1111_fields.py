"""An A1111 request body read into a worker.Request, field by field, so that every refusal
names its field (the API answers it as 400 or 422 with that name).

    body = read_json(raw_bytes)                        # 400: not JSON; 422: not an object
    request, parameters, warnings = read_request(body, pipe, limits, img2img=True)

A1111 builds its request models from StableDiffusionProcessing's __init__ arguments, every
field optional with the class's default, and ignores fields it does not know:
https://github.com/AUTOMATIC1111/stable-diffusion-webui/blob/master/modules/api/models.py
The defaults below are that class's (modules/processing.py), except the size, which is the
loaded model's (A1111's 512 suits only some models), or the init image's in img2img.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math

from PIL import Image

from .worker import Limits, Request, RequestError, output_size

A1111_STEPS = 50
A1111_CFG_SCALE = 7.0
A1111_DENOISING_STRENGTH = 0.75  # the img2img API model's
MAX_INIT_SCALE = 4  # an init image may be this many times the largest output each way (it is resized)
CLIP_SKIP_OVERRIDE = "CLIP_stop_at_last_layers"  # A1111's setting; clients send it in override_settings
# Fields A1111 acts on and minisd does not: a truthy value gets a warning rather than silence.
UNSUPPORTED = {"enable_hr": "hires fix", "restore_faces": "face restoration", "tiling": "tiling",
               "mask": "inpainting", "subseed_strength": "variation seeds", "script_name": "scripts",
               "alwayson_scripts": "scripts", "refiner_checkpoint": "a refiner"}
JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


class BadJSON(RequestError):
    """The body is not JSON at all: HTTP 400, as A1111's server answers."""


def read_json(raw: bytes) -> dict:
    def refuse(constant):  # Python's json reads NaN and Infinity, which JSON does not have
        raise ValueError(f"{constant} is not a JSON value")

    try:
        body = json.loads(raw, parse_constant=refuse)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise BadJSON("body", f"not valid JSON ({str(e)[:100]})") from None
    if not isinstance(body, dict):
        raise RequestError("body", f'must be a JSON object such as {{"prompt": "an apple"}}, got {shown(body)}')
    return body


def read_request(body: dict, pipe, limits: Limits, img2img: bool) -> tuple[Request, dict, list[str]]:
    """The worker's Request, the request as understood (echoed as `parameters`) and warnings."""
    sampler = read_sampler(body, pipe.scheduler.sampler_name)
    overrides = {} if body.get("override_settings") is None else body["override_settings"]
    if not isinstance(overrides, dict):
        raise RequestError("override_settings", f"must be an object, got {shown(overrides)}")
    request = Request(
        prompt=text(body.get("prompt"), "prompt"),
        negative_prompt=text(body.get("negative_prompt"), "negative_prompt"),
        # A1111's 50 steps, unless this server allows fewer: a request that left steps out
        # should not be refused for them.
        steps=integer(body.get("steps"), "steps", min(A1111_STEPS, limits.max_steps)),
        cfg_scale=number(body.get("cfg_scale"), "cfg_scale", A1111_CFG_SCALE),
        seed=integer(body.get("seed"), "seed", -1),
        width=integer(body.get("width"), "width", None),
        height=integer(body.get("height"), "height", None),
        batch_size=integer(body.get("batch_size"), "batch_size", 1),
        n_iter=integer(body.get("n_iter"), "n_iter", 1),
        clip_skip=read_clip_skip(body, overrides, pipe.text_encoder.config.num_hidden_layers),
        sampler_name=sampler)
    strength = number(body.get("denoising_strength"), "denoising_strength", A1111_DENOISING_STRENGTH)
    if img2img:
        request.init_images = read_images(body.get("init_images"), limits)
        if not 0 < strength <= 1:
            raise RequestError("denoising_strength", f"must be in (0, 1] (1 redraws everything), got {strength:g}")
        request.denoising_strength = strength
    warnings = [f"{name}: {what} is not supported by minisd; ignored" for name, what in UNSUPPORTED.items()
                if body.get(name)]
    checkpoint = overrides.get("sd_model_checkpoint")
    if checkpoint not in (None, "", pipe.name):
        warnings.append(f"override_settings.sd_model_checkpoint: {str(checkpoint)[:80]!r} is not loaded; used {pipe.name}")
    width, height = output_size(request, pipe)
    parameters = {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": request.seed,
                  "steps": request.steps, "cfg_scale": request.cfg_scale, "width": width, "height": height,
                  "batch_size": request.batch_size, "n_iter": request.n_iter,
                  "sampler_name": sampler or pipe.scheduler.sampler_name, "clip_skip": request.clip_skip,
                  "override_settings": overrides}
    if img2img:  # the images themselves are not echoed, as A1111 does unless include_init_images
        parameters.update(denoising_strength=strength, init_images=None)
    return request, parameters, warnings


def shown(value) -> str:
    """How a refused value is quoted in an error: its JSON kind and its first characters."""
    quoted = json.dumps(value[:60] if isinstance(value, str) else value)  # not all of a base64 image
    return f"{JSON_KINDS.get(type(value), type(value).__name__)} {quoted[:60]}"


def integer(value, name: str, default):
    if value is None:
        return default
    # JavaScript clients send 20 as 20.0 (every number is a double there); 20.5 is refused.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"must be an integer, got {shown(value)}")
    return value


def number(value, name: str, default):
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(name, f"must be a finite number, got {shown(value)}")
    return float(value)


def text(value, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RequestError(name, f"must be a string, got {shown(value)}")
    return value


def read_clip_skip(body: dict, overrides: dict, layers: int) -> int:
    """A1111's numbering (1 = the last layer), from override_settings as A1111 clients send
    it, else from `clip_skip` as stable-diffusion.cpp's server takes it."""
    name, value = f"override_settings.{CLIP_SKIP_OVERRIDE}", overrides.get(CLIP_SKIP_OVERRIDE)
    if value is None:
        name, value = "clip_skip", body.get("clip_skip")
    clip_skip = integer(value, name, 1)
    if not 1 <= clip_skip <= layers + 1:  # layers + 1: the token embeddings alone, as diffusers allows
        raise RequestError(name, f"must be from 1 (the text encoder's last layer) to {layers + 1}, got {clip_skip}")
    return clip_skip


def sampler_aliases(name: str) -> list[str]:
    """A1111's alias of a DPM++ sampler: "DPM++ 2M" -> k_dpmpp_2m, "DPM++ 2M Karras" -> k_dpmpp_2m_ka."""
    return ["k_" + name.lower().replace("++", "pp").replace(" karras", "_ka").replace(" ", "_")]


def read_sampler(body: dict, ours: str) -> str | None:
    """The sampler asked for: `sampler_name`, else `sampler_index` (which older clients send
    with the name), with A1111 1.9's separate `scheduler` ("Karras") appended. Names are
    matched as A1111 matches them, ignoring case, aliases included."""
    name = None
    for field in ("sampler_name", "sampler_index"):
        if body.get(field) not in (None, ""):
            name = text(body[field], field)
            break
    if name is None:
        return None
    schedule = text(body.get("scheduler"), "scheduler")
    if schedule.lower() not in ("", "automatic"):
        name = f"{name} {schedule}"
    if name.lower() in [ours.lower(), *sampler_aliases(ours)]:
        return ours
    return name  # the worker warns that it used `ours` instead


def read_images(value, limits: Limits) -> list[Image.Image]:
    if value is None:
        raise RequestError("init_images", "img2img needs init_images: a list of base64 images")
    if not isinstance(value, list) or not value:
        raise RequestError("init_images", f"must be a non-empty list of base64 images, got {shown(value)}")
    return [read_image(item, i, limits) for i, item in enumerate(value)]


def read_image(value, index: int, limits: Limits) -> Image.Image:
    """One base64 image, with or without a `data:image/png;base64,` prefix, as A1111 takes it."""
    where = f"image {index}"
    if not isinstance(value, str):
        raise RequestError("init_images", f"{where} must be a base64 string, got {shown(value)}")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    value = "".join(value.split())  # line breaks, as some encoders wrap
    value += "=" * (-len(value) % 4)  # padding, which some clients leave off
    try:
        data = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise RequestError("init_images", f"{where} is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise RequestError("init_images", f"{where} is too large to decode") from None
    except Exception:  # noqa: BLE001 - whatever PIL makes of the bytes, they are not an image it reads
        raise RequestError("init_images", f"{where} is not an image (PNG, JPEG, WebP, ...) that can be read") from None
    if image.width > MAX_INIT_SCALE * limits.max_width or image.height > MAX_INIT_SCALE * limits.max_height:
        raise RequestError("init_images", f"{where} is {image.width}x{image.height}, more than this server "
                                          f"takes ({MAX_INIT_SCALE * limits.max_width}x{MAX_INIT_SCALE * limits.max_height})")
    try:
        image.load()
    except Exception as e:  # noqa: BLE001 - truncated or corrupt image data
        raise RequestError("init_images", f"{where} could not be decoded ({str(e)[:100]})") from None
    return image
