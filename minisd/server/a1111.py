"""AUTOMATIC1111's REST API, in front of the one GenerationQueue, for the tools that speak it
(chat front-ends, painting plugins, bots). https://github.com/AUTOMATIC1111/stable-diffusion-webui/wiki/API

    POST /sdapi/v1/txt2img     {"prompt": ..., "steps": ..., ...} -> {"images": [base64 PNG], "parameters": {...}, "info": "<JSON>"}
    POST /sdapi/v1/img2img     the same, with "init_images": [base64] and "denoising_strength"
    GET  /sdapi/v1/progress    the running job: progress 0..1, eta_relative, state
    POST /sdapi/v1/interrupt   stop the running job
    GET  /sdapi/v1/sd-models   the one loaded model
    GET  /sdapi/v1/samplers    the one sampler
    GET  /sdapi/v1/options     a few of A1111's settings; POST is accepted and changes nothing

Response shapes follow A1111's modules/api/api.py and models.py; a1111_fields.py reads the
requests. Every error is one JSON object naming the field, never a traceback:
    {"error": "RequestError", "field": "steps", "detail": "steps: must be an integer, got a string \"20\""}
400 for a body that is not JSON, 422 for a field the server cannot serve, 409 for a job stopped
by /interrupt or a shutdown, 500 (logged with its traceback) for anything else.
"""
import asyncio
import base64
import json
import logging
import time

from .. import __version__
from ..errors import InputError
from ..pnginfo import png_bytes
from .a1111_fields import BadJSON, read_json, read_request, sampler_aliases
from .worker import GenerationQueue, Job, RequestError

log = logging.getLogger("minisd")

POLL_S = 0.02  # how often a waiting request looks at its job and its client
# The Pipeline's argument names, in the InputErrors a job may raise, as the API's fields.
PIPELINE_FIELDS = {"image": "init_images", "strength": "denoising_strength", "num_inference_steps": "steps",
                   "guidance_scale": "cfg_scale", "num_images_per_prompt": "batch_size", "generator": "seed"}


class Interrupted(Exception):
    """The job was stopped by POST /interrupt."""


def error_response(status: int, error: str, field: str | None, message: str):
    from fastapi.responses import JSONResponse

    detail = f"{field}: {message}" if field else message
    return JSONResponse({"error": error, "field": field, "detail": detail}, status_code=status)


def json_errors_route():
    """The API's route class, made when the server is built: FastAPI is an optional dependency."""
    from fastapi import HTTPException
    from fastapi.responses import Response
    from fastapi.routing import APIRoute
    from starlette.requests import Request as HTTPRequest

    class JSONErrors(APIRoute):
        """Each endpoint's errors as one JSON object (FastAPI's documented way to wrap a router's
        handlers: https://fastapi.tiangolo.com/how-to/custom-request-and-route/)."""

        def get_route_handler(self):
            handle = super().get_route_handler()

            async def guarded(http: HTTPRequest) -> Response:
                try:
                    return await handle(http)
                except HTTPException:  # FastAPI's own (405, ...): its handler answers them
                    raise
                except RequestError as e:
                    message = str(e).removeprefix(f"{e.field}: ")
                    return error_response(400 if isinstance(e, BadJSON) else 422, "RequestError", e.field, message)
                except Interrupted:
                    return error_response(409, "Interrupted", None, "the job was stopped (POST /sdapi/v1/interrupt, "
                                                                    "or the server is shutting down)")
                except Exception as e:  # the client gets one line; the log gets the traceback
                    log.exception("%s %s failed", http.method, http.url.path)
                    return error_response(500, "InternalError", None,
                                          f"internal error ({type(e).__name__}); the server's log has the details")
            return guarded

    return JSONErrors


def as_request_error(error: InputError) -> RequestError:
    """A Pipeline's InputError ("strength: must be ...") as the API field it comes from."""
    name, sep, message = str(error).partition(": ")
    if not sep or not name.isidentifier():
        return RequestError("body", str(error))
    return RequestError(PIPELINE_FIELDS.get(name, name), message)


def timestamp(job: Job) -> str:
    """When the job started, as A1111 writes job_timestamp."""
    started = time.time() - (time.monotonic() - job.started)
    return time.strftime("%Y%m%d%H%M%S", time.localtime(started))


def api_router(generation: GenerationQueue, info):
    """The /sdapi/v1 endpoints, as a FastAPI APIRouter, in front of `generation`."""
    # Imported here, not at the top: FastAPI is an optional dependency (the [ui] extra). The
    # endpoints' annotations are evaluated at definition, so FastAPI sees these very classes.
    from fastapi import APIRouter
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request as HTTPRequest

    router = APIRouter(prefix="/sdapi/v1", route_class=json_errors_route())
    pipe = generation.pipe
    sampler = pipe.scheduler.sampler_name

    async def generate(http: HTTPRequest, img2img: bool) -> Response:
        body = read_json(await http.body())
        # Decoding init images and, later, encoding PNGs take a while: off the event loop.
        request, parameters, warnings = await run_in_threadpool(read_request, body, pipe, info.limits, img2img)
        job = generation.submit(request)
        while not job.done.is_set():
            if await http.is_disconnected():  # nobody will read the images: free the queue
                job.cancel()
                log.info("a client left; its job %d is cancelled", job.number)
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
            await asyncio.sleep(POLL_S)
        if job.state == "cancelled":
            raise Interrupted
        if isinstance(job.error, InputError):
            raise as_request_error(job.error)
        if job.error is not None:
            raise job.error
        send_images = body.get("send_images") is not False
        answer = await run_in_threadpool(answer_of, job, parameters, warnings, img2img, send_images)
        return JSONResponse(answer)

    def answer_of(job: Job, parameters: dict, warnings: list[str], img2img: bool, send_images: bool) -> dict:
        """A1111's answer: images, the request as understood, and Processed.js()'s info."""
        r, result = job.request, job.result
        images = [base64.b64encode(png_bytes(image, text)).decode("ascii")
                  for image, text in zip(result.images, result.infotexts)] if send_images else []
        warnings = result.warnings + warnings
        flagged = [i for i, nsfw in enumerate(result.nsfw) if nsfw]
        if flagged:
            warnings.append(f"images {flagged} were flagged by the safety checker and are black")
        details = {
            "prompt": r.prompt, "all_prompts": [r.prompt] * r.count,
            "negative_prompt": r.negative_prompt, "all_negative_prompts": [r.negative_prompt] * r.count,
            "seed": job.seed, "all_seeds": result.seeds, "width": result.width, "height": result.height,
            "sampler_name": sampler, "cfg_scale": r.cfg_scale, "steps": r.steps,
            "batch_size": r.batch_size, "n_iter": r.n_iter,
            "denoising_strength": r.denoising_strength if img2img else None, "clip_skip": r.clip_skip,
            "sd_model_name": info.model_name, "sd_model_hash": None, "index_of_first_image": 0,
            "infotexts": result.infotexts, "styles": [], "job_timestamp": timestamp(job),
            "version": f"minisd {__version__}", "warnings": warnings, "nsfw_content_detected": result.nsfw,
        }
        return {"images": images, "parameters": parameters, "info": json.dumps(details)}

    @router.post("/txt2img")
    async def txt2img(http: HTTPRequest) -> Response:
        return await generate(http, img2img=False)

    @router.post("/img2img")
    async def img2img(http: HTTPRequest) -> Response:
        return await generate(http, img2img=True)

    @router.get("/progress")
    async def progress() -> dict:
        """A1111's shape (its State.dict()); job_count counts the jobs queued and running,
        job_no is the running job's n_iter batch."""
        now = generation.progress()
        job: Job | None = now["job"]
        state = {"skipped": False, "interrupted": bool(job and job.cancelled),
                 "job": ("img2img" if job.request.init_images else "txt2img") if job else "",
                 "job_count": now["queued"] + (job is not None), "job_no": job.iteration if job else 0,
                 "sampling_step": job.step if job else 0, "sampling_steps": job.steps if job else 0,
                 "job_timestamp": timestamp(job) if job else "0"}
        return {"progress": now["progress"], "eta_relative": now["eta_relative"], "state": state,
                "current_image": None, "textinfo": None}

    @router.post("/interrupt")
    async def interrupt() -> dict:
        job = generation.progress()["job"]
        if job is not None:
            job.cancel()
        return {}

    @router.get("/sd-models")
    async def sd_models() -> list[dict]:
        return [{"title": info.model_name, "model_name": info.model_name, "hash": None, "sha256": None,
                 "filename": info.model_path, "config": None}]

    @router.get("/samplers")
    async def samplers() -> list[dict]:
        return [{"name": sampler, "aliases": sampler_aliases(sampler), "options": {}}]

    @router.get("/options")
    async def options() -> dict:
        return {"sd_model_checkpoint": info.model_name, "sd_checkpoint_hash": None, "CLIP_stop_at_last_layers": 1,
                "samples_format": "png", "sd_vae": "Automatic", "eta_noise_seed_delta": 0}

    @router.post("/options")
    async def set_options() -> None:
        """Accepted (A1111 answers null) so that clients which set options first keep going;
        the model and its settings are fixed when the server starts (clip skip goes per request)."""

    return router
