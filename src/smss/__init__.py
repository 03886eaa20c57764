"""SMSS: a serverless platform for serving machine-learning models.

The public surface is what ``__all__`` names; everything else is internal.
"""

from smss._model import model
from smss.client import AsyncClient, Client
from smss.errors import SmssError
from smss.node.weights import Weights
from smss.spec import Batching, FunctionSpec, Resources, Scaling, TensorSpec
from smss.workflow.builder import Workflow
from smss.workflow.spec import StageSpec, WorkflowSpec

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Batching",
    "Client",
    "FunctionSpec",
    "Resources",
    "Scaling",
    "SmssError",
    "StageSpec",
    "TensorSpec",
    "Weights",
    "Workflow",
    "WorkflowSpec",
    "__version__",
    "model",
]
