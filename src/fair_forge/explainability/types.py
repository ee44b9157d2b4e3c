"""Public value types: methods, granularities and the pydantic result objects.

Everything a user gets back from an explainer is one of these, so they stay plain data: JSON round trip gives an
equal object, and nothing here holds a tensor or a model.
"""

from __future__ import annotations

import math
import os
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class AttributionMethod(str, Enum):
    """Every attribution method of the project; values are the lowercase names ("lime" works wherever this does)."""

    SALIENCY = "saliency"
    INTEGRATED_GRADIENTS = "integrated_gradients"
    GRADIENT_SHAP = "gradient_shap"
    SMOOTH_GRAD = "smooth_grad"
    SQUARE_GRAD = "square_grad"
    VAR_GRAD = "var_grad"
    INPUT_X_GRADIENT = "input_x_gradient"
    LIME = "lime"
    CONTEXT_CITE = "context_cite"
    KERNEL_SHAP = "kernel_shap"
    OCCLUSION = "occlusion"
    SOBOL = "sobol"
    INTEGRATED_JACOBIANS = "integrated_jacobians"

    def __str__(self) -> str:
        return self.value


class Granularity(str, Enum):
    """The unit an attribution is reported for."""

    TOKEN = "token"
    WORD = "word"
    SENTENCE = "sentence"

    def __str__(self) -> str:
        return self.value


class TokenAttribution(BaseModel):
    """The score of one feature (a token, word or sentence of the input).

    ``start``/``end`` are character offsets into the text the feature came from: the content of message
    ``message_index`` for chat input, the prompt otherwise. ``normalized_score`` is ``score / max|score|`` over the
    result, so it keeps the sign and lies in [-1, 1].
    """

    model_config = ConfigDict(frozen=True)

    text: str
    score: float
    position: int = Field(ge=0, description="index of the feature in the result, in reading order")
    normalized_score: float = Field(ge=-1.0, le=1.0)
    start: Optional[int] = None
    end: Optional[int] = None
    message_index: Optional[int] = None
    token_positions: list[int] = Field(default_factory=list, description="positions in the model's input_ids")


class AttributionMatrix(BaseModel):
    """A labelled 2-D score table: target tokens x input features for LMs, query x candidate tokens for siamese."""

    model_config = ConfigDict(frozen=True)

    row_labels: list[str]
    column_labels: list[str]
    values: list[list[float]]
    row_axis: str = "target token"
    column_axis: str = "input feature"

    @model_validator(mode="after")
    def _check_shape(self) -> "AttributionMatrix":
        if len(self.values) != len(self.row_labels):
            raise ValueError(f"matrix has {len(self.values)} rows but {len(self.row_labels)} row labels")
        for row in self.values:
            if len(row) != len(self.column_labels):
                raise ValueError(f"matrix row has {len(row)} values but {len(self.column_labels)} column labels")
        return self

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.row_labels), len(self.column_labels)

    def to_numpy(self) -> Any:
        import numpy as np

        return np.asarray(self.values, dtype=float).reshape(self.shape)


class AttributionMetadata(BaseModel):
    """What an explanation cost and how it was made. Method-specific extras (e.g. LIME's ``r2``) are allowed."""

    model_config = ConfigDict(extra="allow")

    compute_time_seconds: float = 0.0
    n_forward_passes: int = 0
    n_backward_passes: int = 0
    n_tokens_processed: int = 0
    method_params: dict[str, Any] = Field(default_factory=dict)
    convergence_delta: Optional[float] = None
    relative_convergence_delta: Optional[float] = None


def normalize_scores(scores: list[float]) -> list[float]:
    """``score / max|score|``: sign kept, in [-1, 1]; all zeros stay zeros."""
    peak = max((abs(s) for s in scores), default=0.0)
    if peak == 0.0 or not math.isfinite(peak):
        return [0.0 for _ in scores]
    return [max(-1.0, min(1.0, s / peak)) for s in scores]


class AttributionResult(BaseModel):
    """One explanation: which features of ``prompt`` drove the model towards ``target``."""

    prompt: str
    target: str
    method: Union[AttributionMethod, str] = Field(description="a built-in method, or the name of a registered one")
    granularity: Granularity
    attributions: list[TokenAttribution]
    matrix: Optional[AttributionMatrix] = None
    model_name: str = "unknown"
    metadata: AttributionMetadata = Field(default_factory=AttributionMetadata)

    @field_validator("attributions")
    @classmethod
    def _positions_in_order(cls, value: list[TokenAttribution]) -> list[TokenAttribution]:
        for index, attribution in enumerate(value):
            if attribution.position != index:
                raise ValueError(f"attribution {index} has position {attribution.position}; positions must be 0..n-1")
        return value

    @property
    def tokens(self) -> list[str]:
        return [a.text for a in self.attributions]

    @property
    def scores(self) -> list[float]:
        return [a.score for a in self.attributions]

    def get_top_k(self, k: int = 5, by_absolute: bool = True) -> list[TokenAttribution]:
        """The ``k`` strongest features, strongest first (by |score| unless ``by_absolute=False``)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        key = (lambda a: abs(a.score)) if by_absolute else (lambda a: a.score)
        return sorted(self.attributions, key=key, reverse=True)[:k]

    @property
    def top_attributions(self) -> list[TokenAttribution]:
        """The five strongest features by |score|."""
        return self.get_top_k(5)

    def to_dict_for_visualization(self) -> dict[str, Any]:
        """Plain lists for plotting: tokens, scores and normalized scores in reading order."""
        return {
            "tokens": self.tokens,
            "scores": self.scores,
            "normalized_scores": [a.normalized_score for a in self.attributions],
            "method": str(self.method),
            "granularity": self.granularity.value,
            "target": self.target,
        }

    def to_dataframe(self) -> Any:
        """A pandas DataFrame with one row per feature (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("to_dataframe() needs pandas: pip install pandas") from exc
        return pd.DataFrame([a.model_dump() for a in self.attributions])

    def save_html(self, path: str | os.PathLike[str]) -> Path:
        """Write the self-contained, escaped HTML view of this result (no CDN, no network); returns the path."""
        from .visualization import render_html

        target = Path(path)
        target.write_text(render_html(self, standalone=True), encoding="utf-8")
        return target

    def _repr_html_(self) -> str:
        """Notebook rendering: the coloured-text view as an HTML fragment."""
        from .visualization import render_html

        return render_html(self, standalone=False)


class BatchFailure(BaseModel):
    """An item of a batch that could not be explained, and why."""

    index: int
    error_type: str
    message: str


class AttributionBatchResult(BaseModel):
    """The results of ``explain_batch``: one result per item that worked, and the failures of the others."""

    results: list[AttributionResult]
    model_name: str = "unknown"
    total_compute_time_seconds: float = 0.0
    failures: list[BatchFailure] = Field(default_factory=list)
    indices: list[int] = Field(default_factory=list, description="item index of each result in ``results``")

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[AttributionResult]:  # type: ignore[override]
        return iter(self.results)

    def __getitem__(self, index: int) -> AttributionResult:
        return self.results[index]
