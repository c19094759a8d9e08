"""MLflow model registry for unclip checkpoints: pickle-free logging, aliases, loading by URI."""

from unclip.registry.mlflow_models import (pinned_uri, register_cascade, register_checkpoint,
                                           resolve_checkpoint)

__all__ = ["pinned_uri", "register_cascade", "register_checkpoint", "resolve_checkpoint"]
