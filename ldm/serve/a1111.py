"""AUTOMATIC1111's API (modules/api/models.py, processing.py there) in the pipeline's terms.

A request body is a JSON object with A1111's field names and defaults; `parse_request` turns it into
a `Job` (the pipeline's keywords), ignoring the fields A1111 clients send that change nothing, and
refusing with an `ApiError` (a 4xx with a one-line message naming the field) a value we cannot
honour: a hires pass, face restoration, scripts, subseeds, a sampler we do not have.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import random
import re
import time
from dataclasses import dataclass, field

from ldm.sampling import SAMPLERS, resolve_sampler

OFF = {  # fields we cannot honour: the values that mean "off", as A1111 clients send them
    "enable_hr": (False, None), "restore_faces": (False, None), "tiling": (False, None),
    "subseed_strength": (0, None), "script_name": (None, ""), "seed_resize_from_h": (0, -1, None),
    "seed_resize_from_w": (0, -1, None), "resize_mode": (0, None), "initial_noise_multiplier": (1, None),
}
EMPTY_OK = ("styles", "script_args", "alwayson_scripts")  # lists / dicts that must be empty (or absent)
SCHEDULERS = {"automatic": "", "karras": "_karras"}  # A1111's schedulers we have, as our sampler suffix
INPAINTING_FILL = {0: "fill", 1: "original"}  # A1111's masked content: 2 (latent noise), 3 (latent nothing) not built


class ApiError(ValueError):
    """A request we refuse: the HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each is a flag of `ldm-serve`."""

    max_steps: int = 150
    max_images: int = 16  # batch_size x n_iter
    max_pixels: int = 1024 * 1024  # per image drawn, and per picture sent
    max_side: int = 2048


@dataclass
class Job:
    """One request, as the pipeline's keywords: `shared` must be equal for requests to share a call."""

    kind: str  # "txt2img" | "img2img"
    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    shared: dict  # the pipeline keywords all images of a call share (sampler, steps, size, strength, ...)
    images: list = field(default_factory=list)  # img2img: one picture per image
    masks: list = field(default_factory=list)  # inpainting: one mask per image
    model: str | None = None  # a model title from /sd-models; None: the current one
    fields: dict = field(default_factory=dict)  # the request as A1111 echoes it back ("parameters")
    created: float = field(default_factory=time.time)

    @property
    def key(self) -> tuple:
        """Requests with equal keys can be drawn in one pipeline call (the same LoRA tags included)."""
        from ldm.lora import prompt_tags

        tags = sorted({tag for p in self.prompts for tag in prompt_tags(p)[1]})
        return (self.kind, self.model, json.dumps(self.shared, sort_keys=True, default=str), tuple(tags))


def samplers() -> list[dict]:
    """GET /sdapi/v1/samplers: A1111's display names, with our names and k-diffusion's as aliases."""
    return [{"name": spec.a1111 or name, "aliases": [name, *spec.aliases], "options": {}}
            for name, spec in SAMPLERS.items()]


def schedulers() -> list[dict]:
    """GET /sdapi/v1/schedulers: the two we honour (any sampler; Karras σ where it has a variant)."""
    return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
            {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}]


def _number(body: dict, name: str, default, kind=float, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(422, f"{name}: expected a number, got {value!r}")
    if kind is int:
        if value != int(value):
            raise ApiError(422, f"{name}: expected a whole number, got {value!r}")
        value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(422, f"{name}: {value} is outside [{low}, {high}]")
    return value


def _text(body: dict, name: str) -> str:
    value = body.get(name) or ""
    if not isinstance(value, str):
        raise ApiError(422, f"{name}: expected a string, got {type(value).__name__}")
    return value


def sampler_name(body: dict) -> str:
    """Our sampler for A1111's `sampler_name` (or the older `sampler_index`) and `scheduler`; a 404
    for a sampler we do not have, as A1111 answers."""
    name = body.get("sampler_name") or body.get("sampler_index") or "Euler"
    scheduler = str(body.get("scheduler") or "automatic").lower()
    if not isinstance(name, str):
        raise ApiError(422, f"sampler_name: expected a string, got {type(name).__name__}")
    try:
        ours = resolve_sampler(name)
    except ValueError:
        raise ApiError(404, f"Sampler not found: {name}") from None
    if scheduler not in SCHEDULERS:
        raise ApiError(422, f"scheduler: {scheduler!r} is not offered; choose one of: {', '.join(SCHEDULERS)}")
    if SCHEDULERS[scheduler] and not ours.endswith("_karras"):
        if ours + "_karras" not in SAMPLERS:
            raise ApiError(422, f"scheduler: sampler {name} has no Karras variant")
        ours += "_karras"
    return ours


def decode_picture(data, name: str, max_pixels: int):
    """A base64 picture (with or without a `data:image/...;base64,` prefix) as an RGB PIL image."""
    from ldm.data.images import BadSample, load_image

    try:
        return load_image(picture_bytes(data, name), key=name, max_pixels=max_pixels)
    except BadSample as e:
        raise ApiError(422, f"{name}: {e.reason.replace('_', ' ')}" + (f" ({e.detail})" if e.detail else "")) from None


def picture_bytes(data, name: str) -> bytes:
    """The file bytes of a base64 picture field; an ApiError for a URL (never fetched) or bad base64."""
    if not isinstance(data, str) or not data:
        raise ApiError(422, f"{name}: expected a base64-encoded picture")
    if data.startswith(("http://", "https://", "file:")):
        raise ApiError(422, f"{name}: URLs are not fetched; send the picture itself, base64-encoded")
    data = re.sub(r"^data:[^,]*,", "", data, count=1)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{name}: not valid base64") from None


def parse_request(kind: str, body, limits: Limits, models: list[str]) -> Job:
    """A txt2img or img2img request body → a Job, or an ApiError naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(422, "the request body must be a JSON object")
    for name, off in OFF.items():
        if name in body and body[name] not in off:
            raise ApiError(422, f"{name}: {body[name]!r} is not supported by ldm-serve (send {off[0]!r} or leave "
                                "it out)")
    for name in EMPTY_OK:
        if body.get(name):
            raise ApiError(422, f"{name}: not supported by ldm-serve (send it empty or leave it out)")
    prompt, negative = _text(body, "prompt"), _text(body, "negative_prompt")
    batch = _number(body, "batch_size", 1, int, 1, limits.max_images)
    count = batch * _number(body, "n_iter", 1, int, 1, limits.max_images)
    if count > limits.max_images:
        raise ApiError(422, f"batch_size x n_iter: {count} images, more than the limit of {limits.max_images}")
    seed = _number(body, "seed", -1, int, -1, 2**63 - count)
    if seed == -1:
        seed = random.SystemRandom().randrange(2**32)
    width = _number(body, "width", 512, int, 8, limits.max_side)
    height = _number(body, "height", 512, int, 8, limits.max_side)
    if width * height > limits.max_pixels:
        raise ApiError(422, f"width x height: {width}x{height} is more than the limit of {limits.max_pixels} pixels")
    sampler = sampler_name(body)
    shared = {
        "num_inference_steps": _number(body, "steps", 20, int, 1, limits.max_steps),
        "guidance_scale": _number(body, "cfg_scale", 7.0, float, 0, 100),
        "sampler": sampler, "height": height, "width": width,
    }
    if sampler == "ddim":  # A1111 applies eta to DDIM (and ancestral samplers' own noise, which is η = 1 here)
        shared["eta"] = _number(body, "eta", 0.0, float, 0, 1)
    model, settings = None, body.get("override_settings") or {}
    if not isinstance(settings, dict):
        raise ApiError(422, "override_settings: expected an object")
    for key, value in settings.items():
        if key == "sd_model_checkpoint":
            model = find_model(value, models)
        elif key == "CLIP_stop_at_last_layers":
            skip = _number(settings, key, 1, int, 1, 12) - 1
            if skip:
                shared["clip_skip"] = skip
        else:
            raise ApiError(422, f"override_settings: {key!r} is not supported by ldm-serve")
    job = Job(kind, [prompt] * count, [negative] * count, [seed + i for i in range(count)], shared, model=model,
              fields={k: v for k, v in body.items() if k not in ("init_images", "mask")})
    if kind == "img2img":
        parse_img2img(body, job, limits)
    return job


def parse_img2img(body: dict, job: Job, limits: Limits) -> None:
    """The img2img fields: init_images (one, or one per image), mask and A1111's mask options."""
    pictures = body.get("init_images")
    if not isinstance(pictures, list) or not pictures:
        raise ApiError(422, "init_images: expected a list of base64-encoded pictures")
    n = len(job.prompts)
    if len(pictures) not in (1, n):
        raise ApiError(422, f"init_images: {len(pictures)} pictures for {n} images; send one, or one per image")
    images = [decode_picture(p, f"init_images[{i}]", limits.max_pixels) for i, p in enumerate(pictures)]
    job.images = images * n if len(images) == 1 else images
    job.shared["strength"] = _number(body, "denoising_strength", 0.75, float, 0, 1)
    if job.shared["strength"] == 0:
        raise ApiError(422, "denoising_strength: 0 changes nothing; send a value in (0, 1]")
    if body.get("mask"):
        mask = decode_picture(body["mask"], "mask", limits.max_pixels)
        job.masks = [mask] * n
        fill = _number(body, "inpainting_fill", 0, int, 0, 3)
        if fill not in INPAINTING_FILL:
            raise ApiError(422, f"inpainting_fill: {fill} (latent noise / latent nothing) is not supported; send 0 "
                                "(fill) or 1 (original)")
        job.shared.update(mask_blur=_number(body, "mask_blur", 4, float, 0, 256),
                          masked_content=INPAINTING_FILL[fill],
                          mask_invert=bool(_number(body, "inpainting_mask_invert", 0, int, 0, 1)))
        if body.get("inpaint_full_res", True) not in (False, 0):  # A1111's default: only masked
            job.shared.update(inpaint_area="masked",
                              masked_padding=_number(body, "inpaint_full_res_padding", 32, int, 0, 1024))


def find_model(name, models: list[str]) -> str:
    """The /sd-models title `name` names: a title, or a model's name without its hash; else a 404."""
    if not isinstance(name, str):
        raise ApiError(422, "sd_model_checkpoint: expected a model title from /sdapi/v1/sd-models")
    for title in models:
        if name in (title, title.rsplit(" [", 1)[0]):
            return title
    raise ApiError(404, f"sd_model_checkpoint: no model {name!r}; see /sdapi/v1/sd-models")


def info_json(job: Job, parameters: list[str], model_title: str, model_hash: str | None) -> str:
    """The `info` A1111 returns: a JSON string with the seeds and each image's infotext."""
    shared = job.shared
    return json.dumps({
        "prompt": job.prompts[0], "all_prompts": job.prompts, "negative_prompt": job.negatives[0],
        "all_negative_prompts": job.negatives, "seed": job.seeds[0], "all_seeds": job.seeds,
        "subseed": -1, "all_subseeds": [-1] * len(job.seeds), "subseed_strength": 0,
        "width": shared["width"], "height": shared["height"], "sampler_name": shared["sampler"],
        "cfg_scale": shared["guidance_scale"], "steps": shared["num_inference_steps"],
        "batch_size": job.fields.get("batch_size", 1), "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model_title.rsplit(" [", 1)[0], "sd_model_hash": model_hash,
        "denoising_strength": shared.get("strength"), "clip_skip": shared.get("clip_skip", 0) + 1,
        "index_of_first_image": 0, "infotexts": parameters, "styles": [], "extra_generation_params": {},
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)), "version": "ldm",
    })
