"""The errors the server and its model process share."""
from __future__ import annotations


class Busy(Exception):
    """The model's queue is full."""


class RequestError(Exception):
    """A request that cannot be served as asked; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ModelProcessError(RuntimeError):
    """The model process failed (it died, or an unexpected error in a call)."""
