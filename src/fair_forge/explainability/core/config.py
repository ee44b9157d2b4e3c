"""The options an ``AttributionExplainer`` was built with, as one frozen value.

A dataset run records the options that change results (``fingerprint``) and compares them on resume; a Ray actor
rebuilds the explainer from the whole config (``options``), so that every option travels to a worker, including
ones added later.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from .types import Granularity

#: options that change no result (call sizes, memory, recomputation, printing): left out of the fingerprint
RESULT_NEUTRAL = frozenset({"default_method", "default_granularity", "verbose", "batch_size", "prefix_cache",
                            "max_memory", "checkpoint"})


@dataclass(frozen=True)
class ExplainerConfig:
    """Every option of an ``AttributionExplainer`` except the model and the tokenizer (validated by the explainer)."""

    default_method: str
    default_granularity: Granularity
    model_name: str
    verbose: bool = False
    score: str = "sum"
    batch_size: Optional[int] = None
    include_template_tokens: bool = False
    prefix_cache: bool = True
    max_memory: Optional[int] = None
    checkpoint: Optional[bool] = None
    proxy_model_name: Optional[str] = None  # the proxy that scores ablations (a model, so not an option to rebuild)
    proxy_check_rows: int = 16

    def options(self) -> dict[str, Any]:
        """Keyword arguments that rebuild an equal explainer: ``AttributionExplainer(model, tokenizer, **options)``
        (with the proxy model too, if ``proxy_model_name`` names one)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if field.name != "proxy_model_name"}

    def fingerprint(self) -> dict[str, Any]:
        """The options that decide an item's result (JSON-able), which a dataset output records."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if field.name not in RESULT_NEUTRAL}
