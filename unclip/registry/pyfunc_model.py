"""MLflow "model from code" for unclip checkpoints: MLflow stores this file as source, no pickle.

The pyfunc only reports what the checkpoint holds; generation goes through the unclip API, which
reads the safetensors + JSON artifacts directly.
"""

import json
import os

import mlflow
from mlflow.pyfunc import PythonModel


class UnclipCheckpoint(PythonModel):
    def load_context(self, context):
        with open(os.path.join(context.artifacts["checkpoint"], "config.json")) as f:
            self.meta = json.load(f)

    def predict(self, context, model_input, params=None):
        return [{"kind": self.meta.get("kind"), "unclip_version": self.meta.get("unclip_version")}]


mlflow.models.set_model(UnclipCheckpoint())
