"""AUTOMATIC1111's REST API (/sdapi/v1/...), in front of the one GenerationQueue.
https://github.com/AUTOMATIC1111/stable-diffusion-webui/wiki/API
"""
from __future__ import annotations

from fastapi import APIRouter

from .worker import GenerationQueue


def api_router(generation: GenerationQueue, info) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1")

    @router.get("/options")
    def options() -> dict:
        return {"sd_model_checkpoint": info.model_name, "CLIP_stop_at_last_layers": 1}

    return router
