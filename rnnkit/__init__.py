"""rnnkit: train and run recurrent sequence models from the command line."""

from rnnkit.version import __version__
from rnnkit.api import load  # (torch is imported when a model is loaded, not here)

__all__ = ["load", "__version__"]
