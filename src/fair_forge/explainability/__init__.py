"""fair_forge.explainability: which input tokens, words or sentences drove a language model to its response.

Only the names below are public; everything else is an implementation detail.
"""

from .errors import (
    BudgetError,
    ContextLengthError,
    ConvergenceWarning,
    ExplainabilityError,
    InvalidInputError,
    ModelLoadError,
    NoAttributableFeaturesError,
    UnknownMethodError,
    UnsupportedModelError,
)
from .explainer import AttributionExplainer, compute_attributions
from .methods import MethodContext, RawAttribution, available_methods, register_method
from .models import DEFAULT_ENCODER_NAME, DEFAULT_MODEL_NAME, default_model_path, load_default_encoder, load_default_model
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

# Imported on first use: sentence-transformers and matplotlib take seconds to import and most sessions need neither.
_LAZY = {
    "SimilarityExplainer": "similarity",
    "IntJacobianExplainableTransformer": "similarity",
    "render_html": "visualization",
    "plot_attributions": "visualization",
    "plot_matrix": "visualization",
    "plot_connections": "visualization",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_ENCODER_NAME",
    "DEFAULT_MODEL_NAME",
    "IntJacobianExplainableTransformer",
    "SimilarityExplainer",
    "default_model_path",
    "plot_attributions",
    "plot_connections",
    "plot_matrix",
    "render_html",
    "AttributionBatchResult",
    "AttributionExplainer",
    "AttributionMatrix",
    "AttributionMetadata",
    "AttributionMethod",
    "AttributionResult",
    "BatchFailure",
    "BudgetError",
    "ContextLengthError",
    "ConvergenceWarning",
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
