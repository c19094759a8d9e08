"""What the registered models predict: each stage's job, and the whole cascade (``unclip``).

The pyfunc logged for every model version (:mod:`unclip.registry.pyfunc_model`, stored by MLflow
as source) hands its artifacts to :func:`load_predictor`; the artifacts are safetensors + JSON only.

| registered model | input columns (DataFrame) | output columns |
| --- | --- | --- |
| clip | ``caption`` and/or ``image`` (base64 PNG/JPEG) | ``text_embedding``, ``image_embedding`` (unit-norm) |
| pca | ``image_embedding``, optional ``n_components`` | ``coefficients`` |
| prior | ``caption``, optional ``seed`` + prior sampling overrides | ``image_embedding`` (z_i) |
| decoder | ``image_embedding`` (z_i), optional ``caption``, ``seed`` + decoder overrides | ``image`` (base64 PNG) |
| upsampler | ``image`` (base64), optional ``seed``, ``upsampler_steps`` | ``image`` (base64 PNG, x4) |
| unclip (cascade) | ``prompt``, optional ``seed``, ``num_images`` + sampling overrides | ``prompt``, ``seed``, ``index``, ``image``, ``width``, ``height`` |

Sampling overrides (all optional; absent means *as trained*): ``prior_guidance``,
``decoder_guidance`` (double), ``prior_steps``, ``prior_candidates``, ``decoder_steps``,
``upsampler_steps`` (long), ``sampler`` (ddim, dpm, ddpm, unclip), ``decoder_eta`` (double),
``upsample`` (boolean). Bad input raises :class:`mlflow.exceptions.MlflowException` with
INVALID_PARAMETER_VALUE, which ``mlflow models serve`` answers with HTTP 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
from typing import Any

import numpy as np

# kind in a checkpoint's config.json -> the stage whose job its pyfunc does
STAGE_OF_KIND = {"clip": "clip", "pca": "pca", "diffusion_prior": "prior", "ar_prior": "prior",
                 "diffusers_unclip_prior": "prior", "decoder": "decoder",
                 "diffusers_unclip_decoder": "decoder", "upsampler": "upsampler",
                 "diffusers_unclip_super_res": "upsampler"}
CASCADE_FILE = "cascade.json"
CASCADE_KIND = "cascade"
MAX_IMAGES = 16  # images per cascade row (num_images)
MAX_PROMPT_CHARS = 1000

OVERRIDES = {"prior_guidance": "double", "decoder_guidance": "double", "prior_steps": "long",
             "prior_candidates": "long", "decoder_steps": "long", "upsampler_steps": "long",
             "sampler": "string", "decoder_eta": "double", "upsample": "boolean"}


def bad_input(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


# ---- values in and out ------------------------------------------------------------------------


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_from_b64(data: str, max_bytes: int | None = None):
    """An RGB PIL image from base64 (a ``data:image/...;base64,`` prefix is allowed)."""
    from PIL import Image, UnidentifiedImageError

    from unclip.data.filtering import to_rgb

    if not isinstance(data, str) or not data:
        raise bad_input("image: expected a base64-encoded PNG or JPEG string")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_input("image: not valid base64") from None
    if max_bytes is not None and len(raw) > max_bytes:
        raise bad_input(f"image: {len(raw)} bytes, more than the limit of {max_bytes}")
    try:
        img = Image.open(io.BytesIO(raw))
        if img.width * img.height > 4096 * 4096:
            raise bad_input(f"image: {img.width}x{img.height} pixels is too large")
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise bad_input(f"image: not a readable image ({str(exc).splitlines()[0][:120]})") from None
    return to_rgb(img)


def _given(value: Any) -> bool:
    if value is None:
        return False
    try:
        return not (isinstance(value, float) and math.isnan(value))
    except TypeError:
        return True


def _value(row: dict, key: str, cast, default=None):
    value = row.get(key)
    if not _given(value):
        return default
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise bad_input(f"{key}: cannot read {value!r} as {cast.__name__}") from None


def settings_from(row: dict):
    """The cascade's :class:`Settings` from a row's optional sampling overrides."""
    from unclip.generation.cascade import Settings

    s = Settings(prior_guidance=_value(row, "prior_guidance", float),
                 decoder_guidance=_value(row, "decoder_guidance", float),
                 prior_steps=_value(row, "prior_steps", int),
                 prior_candidates=_value(row, "prior_candidates", int),
                 decoder_steps=_value(row, "decoder_steps", int),
                 upsampler_steps=_value(row, "upsampler_steps", int),
                 decoder_sampler=_value(row, "sampler", str),
                 decoder_eta=_value(row, "decoder_eta", float),
                 upsample=_value(row, "upsample", bool, True))
    for key in ("prior_steps", "prior_candidates", "decoder_steps", "upsampler_steps"):
        v = getattr(s, key)
        if v is not None and v < 1:
            raise bad_input(f"{key}: must be at least 1, got {v}")
    if s.decoder_sampler is not None and s.decoder_sampler not in ("ddim", "dpm", "ddpm", "unclip"):
        raise bad_input(f"sampler: one of ddim, dpm, ddpm, unclip; got {s.decoder_sampler!r}")
    return s


def _prompt(row: dict, key: str, required: bool = True) -> str | None:
    text = row.get(key)
    if not _given(text) or not str(text).strip():
        if required:
            raise bad_input(f"{key}: a non-empty caption is required, such as \"a red circle\"")
        return None
    if len(str(text)) > MAX_PROMPT_CHARS:
        raise bad_input(f"{key}: {len(str(text))} characters, more than {MAX_PROMPT_CHARS}")
    return str(text).strip()


def _records(model_input) -> list[dict]:
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        return [model_input]
    return list(model_input)


def _generator(row: dict):
    import torch

    return torch.Generator().manual_seed(_value(row, "seed", int, 0))


def _device() -> str:
    import torch

    return os.environ.get("UNCLIP_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


# ---- one predictor per stage ------------------------------------------------------------------


class ClipPredictor:
    def __init__(self, folder: str):
        from unclip.models.clip import load_clip

        self.clip = load_clip(folder).to(_device())

    def __call__(self, rows: list[dict]):
        import pandas as pd

        captions = {i: _prompt(r, "caption", required=False) for i, r in enumerate(rows)}
        images = {i: image_from_b64(r["image"]) for i, r in enumerate(rows) if _given(r.get("image"))}
        captions = {i: c for i, c in captions.items() if c is not None}
        missing = [i for i in range(len(rows)) if i not in captions and i not in images]
        if missing:
            raise bad_input(f"rows {missing}: each row needs a caption or an image")
        text = dict(zip(captions, self.clip.encode_text(list(captions.values())))) if captions else {}
        image = dict(zip(images, self.clip.encode_images(list(images.values())))) if images else {}
        return pd.DataFrame({"text_embedding": [text[i].tolist() if i in text else None for i in range(len(rows))],
                             "image_embedding": [image[i].tolist() if i in image else None
                                                 for i in range(len(rows))]})


class PcaPredictor:
    def __init__(self, folder: str):
        from unclip.embeddings.pca import PCA

        self.pca = PCA.load(folder)

    def __call__(self, rows: list[dict]):
        import pandas as pd

        out = []
        for r in rows:
            z = _embedding(r, self.pca.dim)
            n = _value(r, "n_components", int, self.pca.n_components)
            if not 1 <= n <= self.pca.n_components:
                raise bad_input(f"n_components: between 1 and {self.pca.n_components}, got {n}")
            out.append(self.pca.transform(z[None].astype(np.float64), n=n)[0].tolist())
        return pd.DataFrame({"coefficients": out})


def _embedding(row: dict, dim: int) -> np.ndarray:
    z = row.get("image_embedding")
    try:
        z = np.asarray(z, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise bad_input("image_embedding: expected a list of numbers") from None
    if z.shape != (dim,) or not np.isfinite(z).all():
        raise bad_input(f"image_embedding: expected {dim} finite numbers, got shape {tuple(z.shape)}")
    return z


def _cascade(clip: str | None, prior: str | None = None, decoder: str | None = None,
             upsamplers: tuple[str, ...] = (), pca: str | None = None):
    from unclip.generation import ModelRefs, UnCLIP

    if clip is None:
        raise bad_input("this model version was registered without the CLIP it reads captions with; "
                        "register it again (the prior, decoder and evaluate stages do)")
    ups = list(upsamplers) + [None, None]
    return UnCLIP(ModelRefs(clip=clip, prior=prior, decoder=decoder, upsampler1=ups[0],
                            upsampler2=ups[1], pca=pca), device=_device())


class PriorPredictor:
    def __init__(self, folder: str, clip: str | None):
        self.model = _cascade(clip, prior=folder)

    def __call__(self, rows: list[dict]):
        import pandas as pd

        out = []
        for r in rows:
            z = _run(self.model.prior_sample, [_prompt(r, "caption")], settings_from(r), _generator(r))
            out.append(z[0].float().cpu().numpy().tolist())
        return pd.DataFrame({"image_embedding": out})


class DecoderPredictor:
    def __init__(self, folder: str, clip: str | None):
        self.model = _cascade(clip, decoder=folder)

    def __call__(self, rows: list[dict]):
        import pandas as pd
        import torch

        from unclip.generation.images import to_pil

        out = []
        for r in rows:
            z = torch.from_numpy(_embedding(r, int(self.model.clip.dim)))[None].to(self.model.device)
            caption = _prompt(r, "caption", required=False)
            x = _run(self.model.decode, z, None if caption is None else [caption], settings_from(r),
                     _generator(r))
            out.append(png_b64(to_pil(x)[0]))
        return pd.DataFrame({"image": out})


class UpsamplerPredictor:
    def __init__(self, folder: str):
        from unclip.generation.models import load_stage

        self.model = load_stage(folder, "upsampler").to(_device())

    def __call__(self, rows: list[dict]):
        import pandas as pd
        import torch

        from unclip.generation.images import from_pil, to_pil

        out = []
        for r in rows:
            img = image_from_b64(r.get("image"))
            if img.width != img.height:
                raise bad_input(f"image: the upsampler takes square images, got {img.width}x{img.height}")
            steps = _value(r, "upsampler_steps", int)
            with torch.no_grad():
                x = self.model.upsample(from_pil([img], img.width).to(_device()), steps=steps,
                                        generator=_generator(r))
            out.append(png_b64(to_pil(x)[0]))
        return pd.DataFrame({"image": out})


class CascadePredictor:
    """The registered ``unclip`` model: the whole cascade of :class:`unclip.generation.UnCLIP`."""

    def __init__(self, spec: dict):
        models = spec["models"]
        self.model = _cascade(models["clip"], models["prior"], models["decoder"],
                              tuple(m for m in (models.get("upsampler1"), models.get("upsampler2")) if m),
                              models.get("pca"))

    def __call__(self, rows: list[dict]):
        import pandas as pd

        out = []
        for r in rows:
            prompt = _prompt(r, "prompt")
            n = _value(r, "num_images", int, 1)
            if not 1 <= n <= MAX_IMAGES:
                raise bad_input(f"num_images: between 1 and {MAX_IMAGES}, got {n}")
            seed = _value(r, "seed", int, 0)
            stages = _run(self.model.generate, prompt, n, seed, settings_from(r))
            for i, im in enumerate(stages[-1]):
                out.append({"prompt": prompt, "seed": seed, "index": i, "image": png_b64(im),
                            "width": im.width, "height": im.height})
        return pd.DataFrame(out, columns=["prompt", "seed", "index", "image", "width", "height"])


def _run(fn, *args):
    """``fn(*args)`` with the library's input errors turned into the registry's bad-input error."""
    from unclip.generation.images import InputError

    try:
        return fn(*args)
    except InputError as exc:
        raise bad_input(str(exc)) from None


def _with_tracking_uri(spec: dict) -> None:
    """The cascade names its stage models ``models:/NAME/VERSION``: they resolve in the tracking
    store of the caller, else (no store configured) in the one it was registered in."""
    import mlflow

    try:
        from mlflow.tracking._tracking_service.utils import is_tracking_uri_set
        configured = is_tracking_uri_set()
    except ImportError:  # pragma: no cover - older layouts
        configured = bool(os.environ.get("MLFLOW_TRACKING_URI"))
    if not configured and spec.get("tracking_uri"):
        mlflow.set_tracking_uri(spec["tracking_uri"])


def load_predictor(artifacts: dict[str, str]):
    """The callable (list of row dicts -> DataFrame) for a model version's artifacts."""
    from unclip import checkpoint

    if "cascade" in artifacts:
        with open(os.path.join(artifacts["cascade"], CASCADE_FILE)) as f:
            spec = json.load(f)
        _with_tracking_uri(spec)
        return CascadePredictor(spec)
    folder = artifacts["checkpoint"]
    kind = checkpoint.read_config(folder).get("kind")
    stage = STAGE_OF_KIND.get(str(kind))
    clip = artifacts.get("clip")
    if stage == "clip":
        return ClipPredictor(folder)
    if stage == "pca":
        return PcaPredictor(folder)
    if stage == "prior":
        return PriorPredictor(folder, clip)
    if stage == "decoder":
        return DecoderPredictor(folder, clip)
    if stage == "upsampler":
        return UpsamplerPredictor(folder)
    raise ValueError(f"{folder}: unknown checkpoint kind {kind!r}")


def predict(predictor, model_input):
    return predictor(_records(model_input))


# ---- signatures -------------------------------------------------------------------------------


def signature(stage: str):
    """The MLflow signature of a stage's model (``cascade`` for the registered ``unclip``)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    def col(kind, name, required=True):
        t = Array(DataType.double) if kind == "array" else kind
        return ColSpec(t, name, required=required)

    overrides = lambda *keys: [col(OVERRIDES[k], k, False) for k in keys]  # noqa: E731
    prior_keys = ("prior_guidance", "prior_steps", "prior_candidates")
    decoder_keys = ("decoder_guidance", "decoder_steps", "sampler", "decoder_eta")
    if stage == "clip":
        inputs = [col("string", "caption", False), col("string", "image", False)]
        outputs = [col("array", "text_embedding", False), col("array", "image_embedding", False)]
    elif stage == "pca":
        inputs = [col("array", "image_embedding"), col("long", "n_components", False)]
        outputs = [col("array", "coefficients")]
    elif stage == "prior":
        inputs = [col("string", "caption"), col("long", "seed", False), *overrides(*prior_keys)]
        outputs = [col("array", "image_embedding")]
    elif stage == "decoder":
        inputs = [col("array", "image_embedding"), col("string", "caption", False),
                  col("long", "seed", False), *overrides(*decoder_keys)]
        outputs = [col("string", "image")]
    elif stage == "upsampler":
        inputs = [col("string", "image"), col("long", "seed", False), *overrides("upsampler_steps")]
        outputs = [col("string", "image")]
    elif stage == CASCADE_KIND:
        inputs = [col("string", "prompt"), col("long", "seed", False), col("long", "num_images", False),
                  *overrides(*OVERRIDES)]
        outputs = [col("string", "prompt"), col("long", "seed"), col("long", "index"),
                   col("string", "image"), col("long", "width"), col("long", "height")]
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))
