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
from .core.types import (
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
    from .explainer import AttributionExplainer, answer_sentences, compute_attributions
    from .methods.registry import MethodContext, RawAttribution, available_methods, register_method
    from .methods.at2 import At2Weights
    from .methods.at2_training import train_at2
    from .runtime.models import (
        DEFAULT_ENCODER_NAME,
        DEFAULT_MODEL_NAME,
        default_model_path,
        load_default_encoder,
        load_default_model,
    )
    from .runs.datasets import DatasetRun, explain_dataset
    from .runs.audit import audit
    from .core.audit import AuditReport
    from .evaluation import (
        FaithfulnessBatchReport,
        FaithfulnessReport,
        FaithfulnessScores,
        compare_methods,
        faithfulness,
        plot_faithfulness,
    )
    from .runtime.generation import generate_targets
    from .core.records import DatasetRecord
    from .similarity.explainer import IntJacobianExplainableTransformer, SimilarityExplainer
    from .runs.sinks import load_results
    from .runs.summary import summarize
    from .text.swap import swap
    from .viz.html import render_html
    from .viz.plots import plot_attributions, plot_connections, plot_matrix, plot_summary

# Imported on first use: torch, transformers, sentence-transformers and matplotlib take seconds to import, and
# `fair-forge-explain --help` or loading a saved result needs none of them.
_LAZY = {
    "AttributionExplainer": "explainer",
    "compute_attributions": "explainer",
    "answer_sentences": "explainer",
    "MethodContext": "methods.registry",
    "RawAttribution": "methods.registry",
    "available_methods": "methods.registry",
    "register_method": "methods.registry",
    "At2Weights": "methods.at2",
    "train_at2": "methods.at2_training",
    "DEFAULT_ENCODER_NAME": "runtime.models",
    "DEFAULT_MODEL_NAME": "runtime.models",
    "default_model_path": "runtime.models",
    "load_default_encoder": "runtime.models",
    "load_default_model": "runtime.models",
    "SimilarityExplainer": "similarity.explainer",
    "IntJacobianExplainableTransformer": "similarity.explainer",
    "render_html": "viz.html",
    "plot_attributions": "viz.plots",
    "plot_matrix": "viz.plots",
    "plot_connections": "viz.plots",
    "DatasetRecord": "core.records",
    "DatasetRun": "runs.datasets",
    "explain_dataset": "runs.datasets",
    "audit": "runs.audit",
    "AuditReport": "core.audit",
    "generate_targets": "runtime.generation",
    "load_results": "runs.sinks",
    "plot_summary": "viz.plots",
    "swap": "text.swap",
    "summarize": "runs.summary",
    "FaithfulnessBatchReport": "evaluation",
    "FaithfulnessReport": "evaluation",
    "FaithfulnessScores": "evaluation",
    "compare_methods": "evaluation",
    "faithfulness": "evaluation",
    "plot_faithfulness": "evaluation",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AuditReport",
    "audit",
    "DatasetRecord",
    "DatasetRun",
    "explain_dataset",
    "generate_targets",
    "load_results",
    "plot_summary",
    "summarize",
    "swap",
    "train_at2",
    "DEFAULT_ENCODER_NAME",
    "DEFAULT_MODEL_NAME",
    "IntJacobianExplainableTransformer",
    "SimilarityExplainer",
    "default_model_path",
    "plot_attributions",
    "plot_connections",
    "plot_matrix",
    "render_html",
    "At2Weights",
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
    "FaithfulnessBatchReport",
    "FaithfulnessReport",
    "FaithfulnessScores",
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
    "answer_sentences",
    "available_methods",
    "compare_methods",
    "compute_attributions",
    "faithfulness",
    "load_default_encoder",
    "load_default_model",
    "plot_faithfulness",
    "register_method",
]
