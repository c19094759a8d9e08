"""Interoperation with diffusers' unCLIP (Karlo): import its pipelines as registered unclip models.

Karlo (Kakao Brain) released an unCLIP cascade in diffusers' ``UnCLIPPipeline`` layout and no
training code. Its components do not map one to one onto our model classes (its decoder is a
``UNet2DConditionModel`` fed by a separate ``UnCLIPTextProjModel``, its super-resolution stage is two
``UNet2DModel``s, one for all steps but the last and one for the last, and its samplers are
``UnCLIPScheduler``s), so they are imported as an *imported model kind*: adapters
(:mod:`unclip.interop.karlo_models`) that hold the diffusers modules themselves, written as unclip
checkpoints (``model.safetensors`` + ``config.json`` holding the diffusers configs: pickle-free),
registered in MLflow under our names and loaded by the cascade through the interface our own
models expose. Its CLIP (transformers' ``CLIPTextModelWithProjection`` /
``CLIPVisionModelWithProjection``) is served by a second CLIP backend
(:mod:`unclip.interop.hf_clip`), not converted to open_clip; the why is in that module.

The way back, ``unclip export-diffusers`` (:mod:`unclip.interop.diffusers_export`), writes
registered models as an ``UnCLIPPipeline`` folder: imported models map exactly (they are diffusers'
modules); our own model kinds do not map onto the pipeline's classes and are refused, each
component named with the reason (the table is in that module and in the README).

Nothing here is imported by ``import unclip``; transformers is imported only by
:mod:`unclip.interop.hf_clip` and :mod:`unclip.interop.diffusers_import`, when an imported CLIP
is loaded or a pipeline is imported (the ``diffusers`` extra installs it).
"""
