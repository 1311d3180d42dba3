"""rnnkit: train and run recurrent sequence models from the command line."""

__version__ = "0.1.0"

from rnnkit.api import load  # noqa: E402  (torch is imported when a model is loaded, not here)

__all__ = ["load", "__version__"]
