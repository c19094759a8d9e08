"""Generation from registered models: text-to-image, variations, interpolations, text diffs and
PCA reconstructions, as a Python API (:class:`UnCLIP`) and the ``unclip`` command."""

from unclip.generation.cascade import UnCLIP
from unclip.generation.models import ModelRefs

__all__ = ["ModelRefs", "UnCLIP"]
