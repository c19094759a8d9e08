"""Schemas of the data, filter, embed and pca stages."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import II

from pipelines.schema.derive import combine, derive
from unclip.data.filtering import FilterConfig
from unclip.embeddings.filters import EmbeddingFilterConfig
from unclip.generation.models import DEFAULT_NAMES
from unclip.options import option


@dataclass
class DataStage:
    """Where the captioned images come from: ``shapes`` (the synthetic generator below writes shards
    into the run directory), a folder of img2dataset-layout shards (``*.tar``, used as they are), or
    a folder of images imported into shards when ``captions`` names a CSV/Parquet file."""

    source: str = "shapes"
    # Importer (source is a folder of images): a CSV or Parquet file with one row per image.
    captions: str | None = None
    image_column: str | None = None    # null: the first of file, filename, filepath, image, path
    caption_column: str | None = None  # null: the first of caption, text, title
    # Generator (source: shapes).
    num_samples: int = option(2000, ge=1)
    resolution: int = option(64, ge=1)
    samples_per_shard: int = option(256, ge=1)
    two_object_prob: float = option(0.5, ge=0, le=1)
    size_word_prob: float = option(0.5, ge=0, le=1)
    position_word_prob: float = option(0.5, ge=0, le=1)
    image_format: str = option("png", choices=("png", "jpg", "webp"))
    supersample: int = option(4, ge=1)  # anti-aliasing: draw at resolution*supersample, downsample
    seed: int = II("seed")


# Every dropped sample is counted under exactly one reason (the first check it fails, in field
# order); a null threshold (or a false flag) switches that check off.
FilterStage = derive(FilterConfig, "FilterStage")


@dataclass
class _Embedding:
    batch_size: int = option(256, ge=1)          # images per CLIP forward pass
    num_actors: int | None = option(None, ge=1)  # CLIP actors (a GPU each where there are GPUs); null: one per CPU
    # A clip-retrieval folder (img_emb/, text_emb/, metadata/) to import instead of computing.
    import_from: str | None = None


EmbedStage = combine("EmbedStage", _Embedding, derive(EmbeddingFilterConfig, "EmbeddingFilters"),
                     doc="CLIP image + text embeddings of every filtered sample, as Parquet; the "
                         "optional embedding-space filters (null: off) count each drop.")


@dataclass
class PcaStage:
    """Principal components of the CLIP image embeddings, fitted out-of-core (Ray Data), and the
    per-component bucket edges the autoregressive prior quantizes into."""

    register_name: str = DEFAULT_NAMES["pca"]  # MLflow registered model name of the PCA folder
    n_components: int | None = option(None, ge=1)  # components kept (the AR prior uses the first n); null: all
    num_buckets: int = option(1024, ge=2)      # quantization buckets per component (the paper: 1024)
    variance_ratio: float = option(0.99, gt=0, le=1)  # reported: fewest components keeping this share
    batch_size: int = option(4096, ge=1)       # rows read and projected at a time per file (worker memory)
    hist_bins: int | None = option(None, ge=1)  # quantile histogram cells per component; null: 8 x num_buckets
