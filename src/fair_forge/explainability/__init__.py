"""fair_forge.explainability: which input tokens, words or sentences drove a language model to its response.

Only the names below are public; everything else is an implementation detail.
"""

from typing import TYPE_CHECKING

from .errors import (
    BudgetError,
    ContextLengthError,
    ConvergenceWarning,
    ExplainabilityError,
    InvalidInputError,
    ModelLoadError,
    NoAttributableFeaturesError,
    NonFiniteScoreError,
    ProbabilityUnderflowWarning,
    UnknownMethodError,
    UnsupportedModelError,
)
from .types import (
    AttributionBatchResult,
    AttributionMatrix,
    AttributionMetadata,
    AttributionMethod,
    AttributionResult,
    BatchFailure,
    ChatMessage,
    Granularity,
    TokenAttribution,
)

if TYPE_CHECKING:  # what the lazy names below are, for type checkers, IDEs and the API reference
    from .explainer import AttributionExplainer, compute_attributions
    from .methods import MethodContext, RawAttribution, available_methods, register_method
    from .models import (
        DEFAULT_ENCODER_NAME,
        DEFAULT_MODEL_NAME,
        default_model_path,
        load_default_encoder,
        load_default_model,
    )
    from .similarity import IntJacobianExplainableTransformer, SimilarityExplainer
    from .visualization import plot_attributions, plot_connections, plot_matrix, render_html

# Imported on first use: torch, transformers, sentence-transformers and matplotlib take seconds to import, and
# `fair-forge-explain --help` or loading a saved result needs none of them.
_LAZY = {
    "AttributionExplainer": "explainer",
    "compute_attributions": "explainer",
    "MethodContext": "methods",
    "RawAttribution": "methods",
    "available_methods": "methods",
    "register_method": "methods",
    "DEFAULT_ENCODER_NAME": "models",
    "DEFAULT_MODEL_NAME": "models",
    "default_model_path": "models",
    "load_default_encoder": "models",
    "load_default_model": "models",
    "SimilarityExplainer": "similarity",
    "IntJacobianExplainableTransformer": "similarity",
    "render_html": "visualization",
    "plot_attributions": "visualization",
    "plot_matrix": "visualization",
    "plot_connections": "visualization",
    "DatasetRecord": "records",
    "DatasetRun": "datasets",
    "explain_dataset": "datasets",
    "generate_targets": "generation",
    "load_results": "sinks",
    "plot_summary": "summary",
    "summarize": "summary",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DatasetRecord",
    "DatasetRun",
    "explain_dataset",
    "generate_targets",
    "load_results",
    "plot_summary",
    "summarize",
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
    "ChatMessage",
    "BudgetError",
    "ContextLengthError",
    "ConvergenceWarning",
    "ExplainabilityError",
    "Granularity",
    "InvalidInputError",
    "MethodContext",
    "ModelLoadError",
    "NoAttributableFeaturesError",
    "NonFiniteScoreError",
    "ProbabilityUnderflowWarning",
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
