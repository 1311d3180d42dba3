"""``rnnkit serve``: trained models over HTTP.

``batching`` merges concurrent requests into batched calls, ``app`` builds the FastAPI
application and its routes, ``worker`` runs the models in a process of their own, and
``errors`` holds what those share.
"""
from rnnkit.serve.app import build_app, model_names
from rnnkit.serve.batching import Batcher, Limits
from rnnkit.serve.errors import Busy, ModelProcessError, RequestError
from rnnkit.serve.worker import ModelProcess

__all__ = ["build_app", "model_names", "Batcher", "Limits", "Busy", "ModelProcessError", "RequestError",
           "ModelProcess"]
