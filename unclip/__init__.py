"""unclip: hierarchical text-conditional image generation with CLIP latents (DALL-E 2).

The library holds the data, model and diffusion code; it imports without Ray. The stage graph
lives in ``pipelines`` and the Ray jobs in ``stages``.
"""

__version__ = "0.1.0"
