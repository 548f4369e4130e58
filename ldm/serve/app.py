"""The FastAPI application: AUTOMATIC1111's routes, HTTP basic auth, request limits, the web page.
(Imported only by `ldm-serve`: FastAPI is the `serve` extra.)

Routes are plain functions run on the server's thread pool; each hands its job to the `Worker` and
waits for the result, so a slow request never blocks /progress or /interrupt.
"""

from __future__ import annotations

import base64
import io
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.middleware.base import BaseHTTPMiddleware

from ldm.serve.a1111 import (
    ApiError, Limits, decode_picture, info_json, parse_request, picture_bytes, samplers, schedulers,
)
from ldm.serve.worker import Worker

STATIC = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    models: dict  # title -> pipeline folder
    model: str  # the title loaded first
    auth: tuple[str, str] | None = None
    limits: Limits = field(default_factory=Limits)
    max_body: int = 32 * 2**20  # bytes of one request
    max_queue: int = 64
    max_batch: int = 16
    device: str | None = None
    lora_dir: str | None = None  # where prompts' <lora:NAME:SCALE> tags find NAME.safetensors


def png_bytes(image, parameters: str) -> bytes:
    """A PNG carrying the A1111 `parameters` text chunk."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def parse_infotext(text: str) -> dict:
    """A1111's infotext → {"Prompt": ..., "Negative prompt": ..., "Steps": "25", ...}: the prompt
    lines, then the settings line, its quoted values unquoted (ldm.request.infotext writes them)."""
    lines = text.strip().split("\n")
    body, settings = (lines[:-1], lines[-1]) if len(lines) > 1 else (lines, "")
    fields = {}
    negative = [i for i, line in enumerate(body) if line.startswith("Negative prompt: ")]
    cut = negative[0] if negative else len(body)
    fields["Prompt"] = "\n".join(body[:cut])
    if negative:
        fields["Negative prompt"] = "\n".join(body[cut:])[len("Negative prompt: "):]
    for key, value in re.findall(r'\s*([\w ]+):\s*("(?:\\.|[^"\\])*"|[^,]*)(?:,|$)', settings):
        fields[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return fields


def create_app(config: ServerConfig, load=None):
    """The application over `config`; `load(title)` → (pipeline, hash) (default: from_pretrained)."""
    if load is None:
        def load(title):
            from ldm import LatentPipeline

            pipe = LatentPipeline.from_pretrained(config.models[title], device=config.device)
            pipe.lora_dir = config.lora_dir
            return pipe, pipe.model_hash

    worker = Worker(load, config.model, config.max_queue, config.max_batch)
    app = FastAPI(title="ldm-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    class Guard(BaseHTTPMiddleware):
        """Auth first, then the body's size: no work for a stranger or an oversized request."""

        async def dispatch(self, request: Request, call_next):
            if config.auth is not None and not authorized(request.headers.get("authorization", ""), config.auth):
                return JSONResponse({"detail": "Not authenticated"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Basic realm="ldm-serve"'})
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > config.max_body):
                return JSONResponse({"detail": f"request body over {config.max_body} bytes"}, status_code=413)
            return await call_next(request)

    app.add_middleware(Guard)

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    async def body_of(request: Request):
        data = b""
        async for chunk in request.stream():  # a body without a length is counted as it comes
            data += chunk
            if len(data) > config.max_body:
                raise ApiError(413, f"request body over {config.max_body} bytes")
        try:
            return json.loads(data or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not JSON ({e.msg if hasattr(e, 'msg') else e})") from None

    def generate(kind: str, body) -> dict:
        job = parse_request(kind, body, config.limits, list(config.models))
        result = worker.submit(job).result()
        pictures = [base64.b64encode(png_bytes(image, text)).decode() for image, text in
                    zip(result.images, result.parameters)]
        return {"images": pictures, "parameters": job.fields,
                "info": info_json(job, result.parameters, result.model_title, result.model_hash)}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await run_in_threadpool(generate, "txt2img", await body_of(request))

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await run_in_threadpool(generate, "img2img", await body_of(request))

    @app.get("/sdapi/v1/samplers")
    def get_samplers():
        return samplers()

    @app.get("/sdapi/v1/schedulers")
    def get_schedulers():
        return schedulers()

    @app.get("/sdapi/v1/scripts")
    def get_scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        return [{"title": title, "model_name": title.rsplit(" [", 1)[0], "hash": title.rsplit("[", 1)[-1][:-1],
                 "sha256": None, "filename": Path(folder).name, "config": None}
                for title, folder in config.models.items()]

    @app.get("/sdapi/v1/options")
    def get_options():
        return options()

    def options() -> dict:
        return {"sd_model_checkpoint": worker.title, "sd_checkpoint_hash": worker.hash,
                "CLIP_stop_at_last_layers": 1, "samples_format": "png"}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        from ldm.serve.a1111 import find_model

        body = await body_of(request)
        if not isinstance(body, dict):
            raise ApiError(422, "the request body must be a JSON object")
        unknown = [k for k in body if k not in options()]
        if unknown:
            raise ApiError(422, f"options: {', '.join(map(repr, unknown))} not supported by ldm-serve")
        if "sd_model_checkpoint" in body:
            await run_in_threadpool(worker.switch, find_model(body["sd_model_checkpoint"], list(config.models)))
        return None

    @app.get("/sdapi/v1/progress")
    def progress():
        p = worker.progress
        fraction = p.step / p.steps if p.running and p.steps else 0.0
        eta = (1 - fraction) * ((time.time() - p.started) / fraction) if fraction else 0.0
        return {"progress": fraction, "eta_relative": eta, "current_image": None, "textinfo": None,
                "state": {"skipped": False, "interrupted": p.interrupted, "job": "ldm" if p.running else "",
                          "job_count": p.job_count + int(p.running), "job_timestamp": p.job_timestamp,
                          "job_no": 0, "sampling_step": p.step, "sampling_steps": p.steps}}

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request):
        body = await body_of(request)
        if not isinstance(body, dict):
            raise ApiError(422, "the request body must be a JSON object")
        from PIL import Image

        data = body.get("image")
        decode_picture(data, "image", config.limits.max_pixels)  # a picture within the limits, or a 422
        text = Image.open(io.BytesIO(picture_bytes(data, "image"))).info.get("parameters", "")
        return {"info": text, "items": {"parameters": text} if text else {},
                "parameters": parse_infotext(text) if text else {}}

    @app.get("/ldm/v1/info")
    def ldm_info():
        """What the page needs beyond A1111's API: the current model and the size it was trained at."""
        return {"model": worker.title, "default_size": worker.pipe.default_size,
                "latent_factor": worker.pipe.latent_factor}

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


def authorized(header: str, auth: tuple[str, str]) -> bool:
    """HTTP basic credentials, compared in constant time."""
    if not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    ok_user = secrets.compare_digest(user.encode(), auth[0].encode())
    ok_password = secrets.compare_digest(password.encode(), auth[1].encode())
    return ok_user and ok_password
