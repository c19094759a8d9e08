"""``unclip serve``: the cascade (:class:`unclip.generation.UnCLIP`) as a Ray Serve application.

HTTP API (JSON in; base64 PNGs in JSON out, or ``"format": "png"`` for one PNG, a grid when
there are several images; every answer carries a request id, in its body and ``X-Request-Id``):

| route | body | does |
| --- | --- | --- |
| ``GET /`` | | the web page (``static/index.html``) |
| ``GET /health`` | | ``{"status": "ok", ...}`` once the models are loaded |
| ``POST /generate`` | ``prompt``, ``num_images``, ``seed`` + sampling | text to image |
| ``POST /vary`` | ``image`` (base64), ``num_images``, ``seed``, ``eta``, ``noise`` + sampling | variations |
| ``POST /interpolate`` | ``image_a``, ``image_b``, ``frames``, ``noise`` + sampling | frames between two images |
| ``POST /edit`` | ``image``, ``from``, ``to``, ``frames``, ``max_theta`` + sampling | text diff |

Sampling fields (all optional, absent = as trained): ``prior_guidance``, ``decoder_guidance``,
``prior_steps``, ``prior_candidates``, ``decoder_steps``, ``upsampler_steps``, ``sampler``,
``eta``, ``upsample``. Limits (:class:`Limits`) answer 413 (body or image too large) or 422
(a field out of range); a body that is not a JSON object answers 400.

Each replica holds one copy of the models (one GPU per replica where the cluster has GPUs).
Concurrent ``/generate`` requests with the same sampling settings are batched (``serve.batch``):
their prompts run through the cascade as one batch, each request's rows drawn from its own seed,
so a request gets the images it gets alone (``"batch": false`` asks for that; the answer's
``batch`` field says how many requests shared its batch).
"""


import asyncio
import base64
import io
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, astuple, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond it the answer is a 4xx naming the field."""

    max_prompt_chars: int = 500
    max_images: int = 8
    max_frames: int = 16
    max_steps: int = 250
    max_upload_bytes: int = 4 * 1024 * 1024  # the whole body; images come base64 inside it


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


SAMPLING_FIELDS = {"prior_guidance": float, "decoder_guidance": float, "prior_steps": int,
                   "prior_candidates": int, "decoder_steps": int, "upsampler_steps": int,
                   "sampler": str, "eta": float, "upsample": bool}
SAMPLERS = ("ddim", "dpm", "ddpm", "unclip")


def _field(body: dict, key: str, kind, default=None, lo=None, hi=None):
    value = body.get(key, default)
    if value is None:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise RequestError(422, f"{key}: expected true or false, got {value!r}")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (kind is int and isinstance(value, float) and not value.is_integer()):
            raise RequestError(422, f"{key}: expected {'an integer' if kind is int else 'a number'}, "
                                    f"got {value!r}")
        value = kind(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise RequestError(422, f"{key}: expected a finite number")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise RequestError(422, f"{key}: must be between {lo} and {hi}, got {value}")
        return value
    if not isinstance(value, str):
        raise RequestError(422, f"{key}: expected a string, got {type(value).__name__}")
    return value


def parse_settings(body: dict, limits: Limits):
    from unclip.generation.cascade import Settings

    steps = {k: _field(body, k, int, lo=1, hi=limits.max_steps)
             for k in ("prior_steps", "decoder_steps", "upsampler_steps")}
    sampler = _field(body, "sampler", str)
    if sampler is not None and sampler not in SAMPLERS:
        raise RequestError(422, f"sampler: one of {', '.join(SAMPLERS)}, got {sampler!r}")
    return Settings(prior_guidance=_field(body, "prior_guidance", float, lo=0, hi=100),
                    decoder_guidance=_field(body, "decoder_guidance", float, lo=0, hi=100),
                    prior_candidates=_field(body, "prior_candidates", int, lo=1, hi=16),
                    decoder_sampler=sampler, decoder_eta=_field(body, "eta", float, lo=0, hi=10),
                    upsample=_field(body, "upsample", bool, True), **steps)


def parse_prompt(body: dict, key: str, limits: Limits) -> str:
    text = _field(body, key, str)
    if text is None or not text.strip():
        raise RequestError(422, f"{key}: a non-empty caption is required, such as \"a red circle\"")
    if len(text) > limits.max_prompt_chars:
        raise RequestError(422, f"{key}: {len(text)} characters, more than the limit of "
                                f"{limits.max_prompt_chars}")
    return text.strip()


def parse_image(body: dict, key: str, limits: Limits):
    from mlflow.exceptions import MlflowException

    from unclip.registry.predict import image_from_b64

    data = body.get(key)
    if not isinstance(data, str) or not data:
        raise RequestError(422, f"{key}: a base64-encoded PNG or JPEG is required")
    try:
        return image_from_b64(data, max_bytes=limits.max_upload_bytes)
    except MlflowException as exc:
        message = exc.message.replace("image:", f"{key}:", 1)
        raise RequestError(413 if "limit" in message or "too large" in message else 422, message) from None


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class _Raise:
    """A batch slot that failed: the request awaiting it re-raises the error."""

    def __init__(self, exc: Exception):
        self.exc = exc


api = FastAPI(title="unclip", description="DALL-E 2-style unCLIP generation")


@serve.deployment(name="unclip")
@serve.ingress(api)
class UnclipService:
    """One replica: the models loaded once, a single worker thread running them (the event loop
    stays free for /health and for queueing), ``/generate`` batched across concurrent requests."""

    def __init__(self, refs: dict[str, str | None], tracking_uri: str | None, limits: dict[str, int],
                 max_batch_size: int = 8, batch_wait_s: float = 0.02, device: str | None = None):
        import mlflow

        from unclip.generation import ModelRefs, UnCLIP

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self.limits = Limits(**limits)
        self.model = UnCLIP(ModelRefs(**refs), device=device)
        self.refs = refs
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unclip-model")
        self._generate_batched.set_max_batch_size(int(max_batch_size))
        self._generate_batched.set_batch_wait_timeout_s(float(batch_wait_s))
        self.served = 0

    # ---- helpers --------------------------------------------------------------------------

    async def _run(self, fn, *args):
        from unclip.generation.images import InputError

        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        except InputError as exc:
            raise RequestError(422, str(exc)) from None

    async def _body(self, request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.limits.max_upload_bytes:
            raise RequestError(413, f"request body of {size} bytes, more than the limit of "
                                    f"{self.limits.max_upload_bytes}")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.limits.max_upload_bytes:
                raise RequestError(413, f"request body larger than the limit of "
                                        f"{self.limits.max_upload_bytes} bytes")
        try:
            body = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object, such as {\"prompt\": \"a red circle\"}")
        return body

    def _answer(self, rid: str, images: list, t0: float, body: dict, **extra) -> Response:
        fmt = body.get("format", "base64")
        headers = {"X-Request-Id": rid}
        self.served += 1
        if fmt == "png":
            from unclip.generation.images import grid

            return Response(png_bytes(images[0] if len(images) == 1 else grid(images)),
                            media_type="image/png", headers=headers)
        return JSONResponse({"request_id": rid, "images": [base64.b64encode(png_bytes(im)).decode("ascii")
                                                           for im in images],
                             "width": images[0].width, "height": images[0].height,
                             "seconds": round(time.monotonic() - t0, 3), **extra}, headers=headers)

    async def _handle(self, request: Request, work) -> Response:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        rid = rid[:64]
        t0 = time.monotonic()
        try:
            body = await self._body(request)
            if body.get("format", "base64") not in ("base64", "png"):
                raise RequestError(422, f"format: base64 or png, got {body.get('format')!r}")
            images, extra = await work(body)
            return self._answer(rid, images, t0, body, **extra)
        except RequestError as exc:
            return JSONResponse({"request_id": rid, "error": str(exc)}, status_code=exc.status,
                                headers={"X-Request-Id": rid})
        except Exception as exc:  # noqa: BLE001 - the service answers and keeps serving
            return JSONResponse({"request_id": rid, "error": f"internal error: {type(exc).__name__}: "
                                                             f"{str(exc).splitlines()[0][:200] if str(exc) else ''}"},
                                status_code=500, headers={"X-Request-Id": rid})

    # ---- routes ---------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "models": self.refs, "resolution": self.model.resolution,
                "upsamplers": len(self.model.upsamplers), "device": str(self.model.device),
                "limits": asdict(self.limits), "served": self.served}

    @api.get("/", response_class=HTMLResponse)
    async def index(self) -> str:
        """The web page: a prompt, guidance, steps and seed; an image grid with variations and
        "edit toward..." on each image; progress while a request runs."""
        from pathlib import Path

        return (Path(__file__).with_name("static") / "index.html").read_text()

    @api.post("/generate")
    async def generate(self, request: Request) -> Response:
        async def work(body):
            prompt = parse_prompt(body, "prompt", self.limits)
            n = _field(body, "num_images", int, 1, lo=1, hi=self.limits.max_images)
            seed = _field(body, "seed", int, 0, lo=0, hi=2**63 - 1)
            s = parse_settings(body, self.limits)
            if body.get("batch", True) is False:
                stages = await self._run(self.model.generate, prompt, n, seed, s)
                return stages[-1], {"batch": 1}
            result = await self._generate_batched((prompt, n, seed, s))
            if isinstance(result, _Raise):
                raise result.exc
            images, shared = result
            return images, {"batch": shared}
        return await self._handle(request, work)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _generate_batched(self, jobs: list[tuple]) -> list[tuple[list, int]]:
        """Concurrent /generate requests: those with the same settings run as one cascade batch,
        each request's rows drawn from its own seed (its images are those it gets alone). An
        error fails only its own group."""
        groups: dict[tuple, list[int]] = {}
        for i, (_p, _n, _seed, s) in enumerate(jobs):
            groups.setdefault(astuple(s), []).append(i)
        results: list[Any] = [None] * len(jobs)
        for members in groups.values():
            try:
                per_job = await self._run(self.model.generate_batch, [jobs[i][:3] for i in members],
                                          jobs[members[0]][3])
            except Exception as exc:  # noqa: BLE001 - handed back to each request of the group
                for i in members:
                    results[i] = exc
                continue
            for i, stages in zip(members, per_job):
                results[i] = (stages[-1], len(members))
        return [_Raise(r) if isinstance(r, Exception) else r for r in results]

    @api.post("/vary")
    async def vary(self, request: Request) -> Response:
        async def work(body):
            image = parse_image(body, "image", self.limits)
            n = _field(body, "num_images", int, 4, lo=1, hi=self.limits.max_images)
            seed = _field(body, "seed", int, 0, lo=0, hi=2**63 - 1)
            noise = _field(body, "noise", str, "inverted")
            stages = await self._run(self.model.vary, image, n, seed, parse_settings(body, self.limits), noise)
            return stages[-1], {}
        return await self._handle(request, work)

    @api.post("/interpolate")
    async def interpolate(self, request: Request) -> Response:
        async def work(body):
            a, b = parse_image(body, "image_a", self.limits), parse_image(body, "image_b", self.limits)
            frames = _field(body, "frames", int, 5, lo=2, hi=self.limits.max_frames)
            seed = _field(body, "seed", int, 0, lo=0, hi=2**63 - 1)
            noise = _field(body, "noise", str, "fixed")
            stages = await self._run(self.model.interpolate, a, b, frames, seed, noise,
                                     parse_settings(body, self.limits))
            return stages[-1], {}
        return await self._handle(request, work)

    @api.post("/edit")
    async def edit(self, request: Request) -> Response:
        async def work(body):
            image = parse_image(body, "image", self.limits)
            source = parse_prompt(body, "from", self.limits)
            target = parse_prompt(body, "to", self.limits)
            frames = _field(body, "frames", int, 5, lo=1, hi=self.limits.max_frames)
            max_theta = _field(body, "max_theta", float, 0.5, lo=0, hi=1)
            seed = _field(body, "seed", int, 0, lo=0, hi=2**63 - 1)
            stages = await self._run(self.model.edit, image, source, target, frames, max_theta,
                                     parse_settings(body, self.limits), seed)
            return stages[-1], {}
        return await self._handle(request, work)


def build_app(refs, tracking_uri: str | None, limits: Limits | None = None, replicas: int = 1,
              gpus_per_replica: float | None = None, max_batch_size: int = 8,
              batch_wait_s: float = 0.02, device: str | None = None, cpus_per_replica: float = 1.0):
    """The bound application: ``replicas`` copies, each with one GPU where the cluster has any
    (``gpus_per_replica`` overrides)."""
    import ray

    if gpus_per_replica is None:
        gpus_per_replica = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    limits = limits or Limits()
    return UnclipService.options(
        num_replicas=int(replicas),
        ray_actor_options={"num_cpus": float(cpus_per_replica), "num_gpus": float(gpus_per_replica)},
        max_ongoing_requests=max(64, 4 * int(max_batch_size)),
    ).bind(asdict(refs), tracking_uri, asdict(limits), int(max_batch_size), float(batch_wait_s), device)


def start(app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, blocking: bool = False):
    """Serve ``app`` over HTTP on ``host:port`` (loopback unless told otherwise)."""
    serve.start(http_options={"host": host, "port": int(port)})
    return serve.run(app, name="unclip", route_prefix="/", blocking=blocking)
