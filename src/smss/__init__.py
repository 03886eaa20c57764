"""SMSS: a serverless platform for serving machine-learning models.

The public surface is what ``__all__`` names; everything else is internal.
"""

from smss._model import model
from smss.errors import SmssError
from smss.node.weights import Weights
from smss.spec import Batching, FunctionSpec, Resources, Scaling, TensorSpec

__version__ = "0.1.0"

__all__ = [
    "Batching",
    "FunctionSpec",
    "Resources",
    "Scaling",
    "SmssError",
    "TensorSpec",
    "Weights",
    "__version__",
    "model",
]
