"""Per-token caption states from a frozen CLIP text tower, cached per caption: what the priors read
beside z_t (captions repeat a lot in small data sets, and the tower is the costliest part of a tiny
training step)."""

from __future__ import annotations

from typing import Iterable

import torch

from unclip.devices import to_device
from unclip.models.clip import ClipEncoder, text_tokens


class CaptionEncoder:
    """Per-token caption encodings from the frozen CLIP text tower, optionally cached per caption
    (captions repeat a lot in small data sets; the tower is the costliest part of a tiny step)."""

    def __init__(self, clip: ClipEncoder, device: torch.device | str = "cpu", cache: bool = True):
        self.clip = clip
        self.model = clip.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.cache: dict[str, tuple[torch.Tensor, int]] | None = {} if cache else None

    @torch.no_grad()
    def _compute(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 even inside the training autocast: a cached caption's states must not depend on
        # whether a step (autocast) or validation first saw it
        with torch.autocast(self.device.type, enabled=False):
            _, states, mask = text_tokens(self.model, to_device(self.clip.tokenize(captions),
                                                                self.device))
        return states, mask

    @torch.no_grad()
    def __call__(self, captions: Iterable[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states (B, L, W), mask (B, L)), trimmed to the longest caption in the batch."""
        captions = [str(c) for c in captions]
        if self.cache is None:
            states, mask = self._compute(captions)
        else:
            missing = sorted({c for c in captions if c not in self.cache})
            for i in range(0, len(missing), 512):
                st, mk = self._compute(missing[i:i + 512])
                for j, c in enumerate(missing[i:i + 512]):
                    n = int(mk[j].sum())
                    self.cache[c] = (st[j, :n].cpu().clone(), n)
            length = max(self.cache[c][1] for c in captions)
            states = torch.zeros(len(captions), length, self.clip.text_width)
            mask = torch.zeros(len(captions), length, dtype=torch.bool)
            for i, c in enumerate(captions):
                st, n = self.cache[c]
                states[i, :n], mask[i, :n] = st, True
        length = int(mask.sum(1).max())
        return states[:, :length].to(self.device), mask[:, :length].to(self.device)
