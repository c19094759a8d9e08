"""The autoregressive prior (Ramesh et al. 2022, sec. 2.2): a causal Transformer over the quantized
leading PCA components of z_i.

z_i is projected on the ``pca`` stage's first ``n_components`` principal directions and each
coefficient is quantized into that PCA's buckets (unclip.embeddings.pca does both). The sequence
is [caption token encodings, z_t, similarity token, code_1 ... code_n]; the similarity token is
the quantized dot product z_i . z_t (quantile buckets of its training distribution). At sampling
the similarity token is drawn from the top half of that distribution (the upper half of the
buckets, which are equally likely by construction), which the paper found gives better samples.
The caption (tokens and z_t) is replaced by learned null tokens ``cond_drop_prob`` of the time, so
logits can be guided (classifier-free guidance on the log-probabilities): one null token at
position 0 (``null_text[0]``) with the other caption positions masked, and ``null_zt``, so the
unconditional branch does not depend on the batch's padded caption length. AR priors trained
before this change had a different null branch (``null_text[:n]``, all n padded positions valid);
the state dict is unchanged (rows of ``null_text`` after the first are unused).

Sampling decodes incrementally with a key/value cache (:meth:`ARPrior.prefill`, then
:meth:`ARPrior.extend` once per code): the prefix is run once and each code costs one position, not
a forward over every position so far (319 codes in the paper). ``sample(use_cache=False)`` keeps the
full recomputation as the reference; both give the same samples.

The PCA mean, directions and bucket edges, and the similarity bucket edges, are buffers of the
model: a checkpoint decodes its own samples with nothing else at hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unclip import checkpoint
from unclip.diffusion.noise import Generators, multinomial, randint, repeat_rows
from unclip.embeddings.pca import PCA
from unclip.models.transformer import CausalTransformer, KVCache, check_heads, check_text, null_caption
from unclip.options import option, validate

KIND = "ar_prior"


@dataclass
class ARPriorConfig:
    dim: int                      # CLIP embedding dimension
    text_width: int               # width of the CLIP text tower's token states
    n_components: int = option(ge=1)  # leading PCA components modelled (319 in the paper)
    num_buckets: int = option(ge=2)   # buckets per component (1024 in the paper)
    sim_buckets: int = option(16, ge=1)  # buckets of the z_i . z_t token
    max_text_len: int = option(77, ge=1)
    width: int = option(256, ge=1)
    layers: int = option(4, ge=1)
    heads: int = option(4, ge=1)
    dropout: float = option(0.0, ge=0, lt=1)
    cond_drop_prob: float = option(0.1, ge=0, le=1)

    def __post_init__(self) -> None:
        validate(self)
        check_heads(self.width, self.heads)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ARPriorConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown AR prior option(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ARPriorSampling:
    """How an AR prior is sampled: one draw, no guidance, the similarity token from the top half."""

    guidance_scale: float = option(1.0, ge=0)  # classifier-free guidance on log-probabilities
    temperature: float = option(1.0, gt=0)
    num_candidates: int = option(1, ge=1)      # >1: re-rank by z_i . z_t as the diffusion prior
    # the z_i . z_t token is drawn from this quantile range of its training distribution
    sim_quantile: tuple[float, float] = option((0.5, 1.0), ge=0, le=1)

    def __post_init__(self) -> None:
        validate(self)


def similarity_edges(sims: np.ndarray, buckets: int) -> np.ndarray:
    """Quantile edges (buckets + 1,) of the training z_i . z_t values: equally likely buckets."""
    sims = np.asarray(sims, np.float64)
    if sims.size < buckets:
        raise ValueError(f"{sims.size} similarity values cannot fill {buckets} quantile buckets")
    return np.maximum.accumulate(np.quantile(sims, np.linspace(0, 1, buckets + 1)))


@dataclass
class Decoding:
    """An incremental decoding in progress: the transformer's key/value cache and how many of its
    positions are the prefix (caption, z_t, similarity token) before the codes."""

    cache: KVCache
    prefix_len: int

    @property
    def codes(self) -> int:
        """Codes fed so far (the component index of the next one)."""
        return self.cache.length - self.prefix_len


def _branches(b: int, device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """Classifier-free guidance in one batch: ``pair`` stacks a batch on itself (conditional rows
    first) and ``drop`` (2B,) marks the second copy's captions as dropped (the null caption)."""
    drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(device)
    return (lambda v: torch.cat([v, v])), drop


class ARPrior(nn.Module):
    def __init__(self, cfg: ARPriorConfig | Mapping[str, Any]):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, ARPriorConfig) else ARPriorConfig.from_dict(cfg)
        c = self.cfg
        self.text_proj = nn.Linear(c.text_width, c.width)
        self.zt_proj = nn.Linear(c.dim, c.width)
        self.sim_embed = nn.Embedding(c.sim_buckets, c.width)
        self.code_embed = nn.Embedding(c.num_buckets, c.width)
        self.comp_embed = nn.Parameter(torch.randn(c.n_components, c.width) * 0.02)
        self.prefix_pos = nn.Parameter(torch.randn(c.max_text_len + 2, c.width) * 0.02)
        self.null_text = nn.Parameter(torch.randn(c.max_text_len, c.width) * 0.02)
        self.null_zt = nn.Parameter(torch.randn(c.width) * 0.02)
        self.transformer = CausalTransformer(c.width, c.layers, c.heads, c.dropout)
        self.head = nn.Linear(c.width, c.num_buckets)
        # the quantizer (float64: it must give the pca stage's buckets exactly)
        self.register_buffer("pca_mean", torch.zeros(c.dim, dtype=torch.float64))
        self.register_buffer("pca_components", torch.zeros(c.n_components, c.dim, dtype=torch.float64))
        self.register_buffer("pca_variance", torch.zeros(c.dim, dtype=torch.float64))
        self.register_buffer("pca_edges", torch.zeros(c.n_components, c.num_buckets + 1, dtype=torch.float64))
        self.register_buffer("sim_edges", torch.linspace(-1, 1, c.sim_buckets + 1, dtype=torch.float64))

    @classmethod
    def from_pca(cls, cfg: ARPriorConfig | Mapping[str, Any], pca: PCA,
                 sim_edges: np.ndarray) -> "ARPrior":
        """A fresh prior whose quantizer is ``pca`` (truncated to n_components) and ``sim_edges``."""
        model = cls(cfg)
        c = model.cfg
        if pca.dim != c.dim:
            raise ValueError(f"PCA is of dim {pca.dim}, the prior's embeddings have dim {c.dim}")
        if pca.num_buckets != c.num_buckets:
            raise ValueError(f"PCA has {pca.num_buckets} buckets per component, config says {c.num_buckets}")
        if c.n_components > pca.n_components:
            raise ValueError(f"n_components {c.n_components} > the {pca.n_components} the PCA kept")
        p = pca.truncated(c.n_components)
        if len(sim_edges) != c.sim_buckets + 1:
            raise ValueError(f"sim_edges must have {c.sim_buckets + 1} values, got {len(sim_edges)}")
        for name, arr in (("pca_mean", p.mean), ("pca_components", p.components),
                          ("pca_variance", p.explained_variance), ("pca_edges", p.bucket_edges),
                          ("sim_edges", sim_edges)):
            getattr(model, name).copy_(torch.from_numpy(np.asarray(arr, np.float64)))
        return model

    # ---- the quantizer ---------------------------------------------------------------------

    def pca(self) -> PCA:
        return PCA(self.pca_mean.cpu().numpy(), self.pca_components.cpu().numpy(),
                   self.pca_variance.cpu().numpy(), 0, self.pca_edges.cpu().numpy())

    def encode(self, z_i: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Bucket codes (B, n_components) of image embeddings."""
        p = self.pca()
        z = np.asarray(torch.as_tensor(z_i).detach().cpu(), np.float64)
        return torch.from_numpy(p.quantize(p.transform(z)))

    def decode(self, codes: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embeddings (B, dim) from bucket codes: bucket centres, inverse PCA, unit norm."""
        p = self.pca()
        z = torch.from_numpy(p.inverse_transform(p.dequantize(codes.cpu().numpy())))
        return F.normalize(z.float(), dim=-1) if normalize else z

    def sim_token(self, z_i: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """Quantized z_i . z_t (B,) in [0, sim_buckets)."""
        s = (F.normalize(z_i.double(), dim=-1) * F.normalize(z_t.double(), dim=-1)).sum(-1)
        edges = self.sim_edges.to(s.device)[1:-1].contiguous()
        return torch.bucketize(s, edges, right=True)

    # ---- the network -----------------------------------------------------------------------

    def _prefix(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, z_t: torch.Tensor,
                sim: torch.Tensor, drop_text: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedded [caption tokens, z_t, similarity token] (B, n + 2, W) and their key
        validity (B, n + 2): the part of the sequence that does not depend on the codes."""
        c = self.cfg
        check_text(text_tokens, text_mask, c.text_width, c.max_text_len, "ARPrior")
        b, n = text_tokens.shape[:2]
        text = self.text_proj(text_tokens.to(self.head.weight.dtype))
        zt = self.zt_proj(z_t.to(text.dtype) * c.dim ** 0.5)
        mask = text_mask.bool()
        if drop_text is not None:
            text, mask = null_caption(text, mask, drop_text, self.null_text[0])
            zt = torch.where(drop_text.bool().view(b, 1), self.null_zt.expand(b, -1), zt)
        prefix = torch.cat([text + self.prefix_pos[:n], (zt + self.prefix_pos[-2])[:, None],
                            (self.sim_embed(sim) + self.prefix_pos[-1])[:, None]], dim=1)
        valid = torch.cat([mask, torch.ones(b, 2, dtype=torch.bool, device=mask.device)], dim=1)
        return prefix, valid

    def _codes(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Embedded codes (B, m, W) that are components start..start+m-1 of the sequence."""
        m = codes.shape[1]
        if start + m >= self.cfg.n_components:
            raise ValueError(f"ARPrior: {start + m} input codes; at most n_components - 1 = "
                             f"{self.cfg.n_components - 1}")
        return self.code_embed(codes) + self.comp_embed[start:start + m]

    def forward(self, codes_in: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                z_t: torch.Tensor, sim: torch.Tensor,
                drop_text: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, m + 1, num_buckets) for codes 1..m+1 given the first m codes ``codes_in``."""
        prefix, valid = self._prefix(text_tokens, text_mask, z_t, sim, drop_text)
        b, n = text_tokens.shape[:2]
        m = codes_in.shape[1]
        seq = torch.cat([prefix, self._codes(codes_in)], dim=1)
        valid = torch.cat([valid, torch.ones(b, m, dtype=torch.bool, device=valid.device)], dim=1)
        h = self.transformer(seq, valid)
        # the similarity token predicts code 1, code j predicts code j+1
        return self.head(h[:, n + 1:])

    # ---- incremental decoding --------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, z_t: torch.Tensor,
                sim: torch.Tensor, drop_text: torch.Tensor | None = None) -> tuple[torch.Tensor, Decoding]:
        """Logits (B, num_buckets) of code 1 and the key/value cache of the prefix, sized for the
        whole sequence; :meth:`extend` then feeds one code at a time (what ``sample`` does)."""
        prefix, valid = self._prefix(text_tokens, text_mask, z_t, sim, drop_text)
        state = Decoding(KVCache(prefix.shape[1] + self.cfg.n_components - 1), prefix.shape[1])
        h = self.transformer(prefix, valid, state.cache)
        return self.head(h[:, -1]), state

    @torch.no_grad()
    def extend(self, state: Decoding, codes: torch.Tensor) -> torch.Tensor:
        """Logits (B, s, num_buckets) of the codes after each of ``codes`` (B, s), the next codes
        of the sequences in ``state`` (which they are appended to): equal, to float rounding, to
        the last s positions of :meth:`forward` on every code so far."""
        x = self._codes(codes, state.codes)
        return self.head(self.transformer(x, None, state.cache))

    def losses(self, z_i: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
               z_t: torch.Tensor, generator: torch.Generator | None = None,
               net: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Mean cross-entropy per code (``loss``, nats), caption dropped ``cond_drop_prob`` of the
        time. ``net``: the module to call (a DDP wrapper of this one, so gradients are all-reduced)."""
        net = self if net is None else net
        codes = self.encode(z_i).to(z_i.device)
        sim = self.sim_token(z_i, z_t)
        drop = torch.rand(z_i.shape[0], generator=generator).to(z_i.device) < self.cfg.cond_drop_prob
        logits = net(codes[:, :-1], text_tokens, text_mask, z_t, sim, drop)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))
        return {"loss": loss}

    # ---- sampling --------------------------------------------------------------------------

    def sim_range(self, sim_quantile: tuple[float, float]) -> tuple[int, int]:
        """Similarity tokens [lo, hi) covering the quantile range ``sim_quantile`` of the training
        z_i . z_t values (bucket k holds quantiles [k, k + 1) / sim_buckets)."""
        q0, q1 = (float(q) for q in sim_quantile)
        if not 0.0 <= q0 < q1 <= 1.0:
            raise ValueError(f"sim_quantile must be (lo, hi) with 0 <= lo < hi <= 1, got {sim_quantile}")
        n = self.cfg.sim_buckets
        lo = min(n - 1, int(round(q0 * n)))
        return lo, max(lo + 1, int(round(q1 * n)))

    @staticmethod
    def guided_log_probs(logits: torch.Tensor, guidance_scale: float = 1.0) -> torch.Tensor:
        """Log-probabilities (B, num_buckets) from next-code logits: (B, V) unguided, or (2B, V)
        with the conditional rows first and the unconditional ones after them, guided as
        ``uncond + s (cond - uncond)`` on their log-softmax (unnormalized)."""
        logp = F.log_softmax(logits.float(), dim=-1)
        if guidance_scale == 1.0:
            return logp
        cond, uncond = logp.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def next_log_probs(self, codes: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                       z_t: torch.Tensor, sim: torch.Tensor, guidance_scale: float = 1.0) -> torch.Tensor:
        """Log-probabilities (B, num_buckets) of the next code after ``codes`` (B, m) from a full
        forward (no cache); guided, ``uncond + s (cond - uncond)`` on the log-softmax of both
        branches (unnormalized), the unconditional branch the null caption, in one batched pass."""
        if guidance_scale == 1.0:
            return self.guided_log_probs(self(codes, text_tokens, text_mask, z_t, sim)[:, -1])
        pair, drop = _branches(codes.shape[0], codes.device)
        logits = self(pair(codes), pair(text_tokens), pair(text_mask), pair(z_t), pair(sim), drop)
        return self.guided_log_probs(logits[:, -1], guidance_scale)

    @torch.no_grad()
    def sample_codes(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, z_t: torch.Tensor,
                     guidance_scale: float = 1.0, temperature: float = 1.0,
                     sim_quantile: tuple[float, float] = (0.5, 1.0),
                     generator: Generators = None, use_cache: bool = True) -> torch.Tensor:
        """Bucket codes (B, n_components), one sequence per row, drawn code by code (the
        similarity token first, uniformly from the buckets of ``sim_quantile``).

        ``use_cache``: decode with a key/value cache (one position per code, each row of both
        guidance branches its own cache row); False recomputes the whole sequence for every code
        (O(n^2) positions), the reference the cache is tested against. Both draw the same random
        numbers in the same order, so they give the same codes."""
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        was_training = self.training
        self.eval()
        try:
            n, bk, dev = self.cfg.n_components, z_t.shape[0], z_t.device
            lo, hi = self.sim_range(sim_quantile)
            sim = randint(lo, hi, bk, generator).to(dev)
            codes = torch.zeros(bk, n, dtype=torch.long, device=dev)
            tt, tm, zt = text_tokens, text_mask, z_t
            if use_cache:
                pair, drop = _branches(bk, dev) if guidance_scale != 1.0 else (lambda v: v, None)
                logits, state = self.prefill(pair(tt), pair(tm), pair(zt), pair(sim), drop)
            for j in range(n):
                if not use_cache:
                    logp = self.next_log_probs(codes[:, :j], tt, tm, zt, sim, guidance_scale)
                else:
                    if j:
                        logits = self.extend(state, pair(codes[:, j - 1:j]))[:, -1]
                    logp = self.guided_log_probs(logits, guidance_scale)
                probs = F.softmax(logp / temperature, dim=-1)
                codes[:, j] = multinomial(probs, generator).to(dev)
        finally:
            self.train(was_training)
        return codes

    @torch.no_grad()
    def sample(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, z_t: torch.Tensor,
               guidance_scale: float = ARPriorSampling.guidance_scale,
               temperature: float = ARPriorSampling.temperature,
               num_candidates: int = ARPriorSampling.num_candidates,
               sim_quantile: tuple[float, float] = ARPriorSampling.sim_quantile,
               generator: Generators = None, use_cache: bool = True) -> torch.Tensor:
        """Unit-norm image embeddings (B, dim). The similarity token is drawn uniformly from the
        buckets in ``sim_quantile`` of its training distribution (the top half by default); with
        several candidates the one with the largest z_i . z_t is kept. ``use_cache``: see
        :meth:`sample_codes` (the same samples either way; False is the slow reference)."""
        from unclip.models.prior import rerank

        if num_candidates < 1:
            raise ValueError("num_candidates must be >= 1")
        b, k = z_t.shape[0], int(num_candidates)
        tt, tm, zt = (v.repeat_interleave(k, 0) for v in (text_tokens, text_mask, z_t))
        codes = self.sample_codes(tt, tm, zt, guidance_scale, temperature, sim_quantile,
                                  repeat_rows(generator, k), use_cache)
        z = self.decode(codes).to(z_t.device).view(b, k, -1)
        return rerank(z, z_t)

    # ---- files -----------------------------------------------------------------------------

    def save(self, folder: str, extra: dict[str, Any] | None = None) -> None:
        checkpoint.save(folder, self.state_dict(), KIND, self.cfg.to_dict(), extra)

    @classmethod
    def from_checkpoint(cls, folder: str) -> "ARPrior":
        state, meta = checkpoint.load(folder, KIND)
        model = cls(ARPriorConfig.from_dict(meta["config"]))
        model.load_state_dict(state)
        return model.eval()
