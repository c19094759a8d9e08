"""MLflow "model from code" for unclip models: MLflow stores this file as source, no pickle.

Every registered model predicts what it is for (a stage's job, or the whole cascade for the
registered ``unclip``); the table of inputs and outputs is in :mod:`unclip.registry.predict`.
The artifacts are the checkpoint folder (safetensors + config.json), the CLIP folder for models
that read captions, or the cascade's ``cascade.json`` naming its stage models by version.
"""

import mlflow
from mlflow.pyfunc import PythonModel


class UnclipModel(PythonModel):
    def load_context(self, context):
        from unclip.registry.predict import load_predictor

        self.predictor = load_predictor(dict(context.artifacts))

    def predict(self, context, model_input, params=None):
        from unclip.registry.predict import predict

        return predict(self.predictor, model_input)


mlflow.models.set_model(UnclipModel())
