"""fair_forge.explainability: which input tokens, words or sentences drove a language model to its response.

Only the names below are public; everything else is an implementation detail.
"""

from .errors import (
    BudgetError,
    ContextLengthError,
    ExplainabilityError,
    InvalidInputError,
    ModelLoadError,
    NoAttributableFeaturesError,
    UnknownMethodError,
    UnsupportedModelError,
)
from .explainer import AttributionExplainer, compute_attributions
from .methods import MethodContext, RawAttribution, available_methods, register_method
from .models import load_default_encoder, load_default_model
from .types import (
    AttributionBatchResult,
    AttributionMatrix,
    AttributionMetadata,
    AttributionMethod,
    AttributionResult,
    BatchFailure,
    Granularity,
    TokenAttribution,
)

__all__ = [
    "AttributionBatchResult",
    "AttributionExplainer",
    "AttributionMatrix",
    "AttributionMetadata",
    "AttributionMethod",
    "AttributionResult",
    "BatchFailure",
    "BudgetError",
    "ContextLengthError",
    "ExplainabilityError",
    "Granularity",
    "InvalidInputError",
    "MethodContext",
    "ModelLoadError",
    "NoAttributableFeaturesError",
    "RawAttribution",
    "TokenAttribution",
    "UnknownMethodError",
    "UnsupportedModelError",
    "available_methods",
    "compute_attributions",
    "load_default_encoder",
    "load_default_model",
    "register_method",
]
