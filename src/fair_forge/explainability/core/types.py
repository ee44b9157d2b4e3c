"""Public value types: methods, granularities and the pydantic result objects.

Everything a user gets back from an explainer is one of these, so they stay plain data: JSON round trip gives an
equal object, and nothing here holds a tensor or a model.
"""

from __future__ import annotations

import math
import operator
import os
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import InvalidInputError, NonFiniteScoreError

#: Why a score may come out NaN or infinite, said in the error that reports one.
_NON_FINITE_CAUSES = (
    "the method's parameters left it unmeasured or unbounded (e.g. occlusion with stride > window, an infinite "
    "noise_std), or the model overflowed (low precision); check the parameters, or run the model in float32"
)


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
    ATTENTION = "attention"
    AT2 = "at2"
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
    counterfactual_text: Optional[str] = Field(
        None, description="for a counterfactual explanation: the text of x' this feature replaces ('' where x' has none)")

    @model_validator(mode="after")
    def _finite(self) -> "TokenAttribution":
        """NaN would be drawn as a strong score and would not survive JSON: refuse it, naming the feature."""
        if not math.isfinite(self.score):
            raise NonFiniteScoreError(
                f"feature {self.position} ({self.text!r}) has score {self.score}: {_NON_FINITE_CAUSES}"
            )
        return self


class ChatMessage(BaseModel):
    """One message of the explained conversation, as the user gave it (offsets of features index ``content``)."""

    model_config = ConfigDict(frozen=True)

    role: str
    content: str


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
        for row_index, row in enumerate(self.values):
            if len(row) != len(self.column_labels):
                raise ValueError(f"matrix row has {len(row)} values but {len(self.column_labels)} column labels")
            for column_index, value in enumerate(row):
                if not math.isfinite(value):
                    raise NonFiniteScoreError(
                        f"matrix cell ({self.row_labels[row_index]!r}, {self.column_labels[column_index]!r}) is "
                        f"{value}: {_NON_FINITE_CAUSES}"
                    )
        return self

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.row_labels), len(self.column_labels)

    def to_numpy(self) -> Any:
        import numpy as np

        return np.asarray(self.values, dtype=float).reshape(self.shape)


class AttributionMetadata(BaseModel):
    """What an explanation cost and how it was made. Method-specific extras (e.g. LIME's ``r2``) are allowed."""

    # NaN/inf in a diagnostic (an extra such as LIME's r2) are written as the JSON constants so results reload
    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants")

    compute_time_seconds: float = 0.0
    n_forward_passes: int = 0
    n_backward_passes: int = 0
    n_tokens_processed: int = 0
    method_params: dict[str, Any] = Field(default_factory=dict)
    convergence_delta: Optional[float] = None
    relative_convergence_delta: Optional[float] = None
    target_score: Optional[float] = Field(
        None, description="the explained score at the input (log p(target), or the contrastive margin)")
    baseline_score: Optional[float] = Field(
        None, description="the explained score at the method's baseline (IG's, or the fully masked input), if it has one")
    counterfactual_score: Optional[float] = Field(None, description="for a counterfactual explanation: f(x')")


def check_finite_scores(scores: Sequence[float], labels: Optional[Sequence[str]] = None) -> None:
    """Raise ``NonFiniteScoreError`` naming the first NaN/inf score (and its label when given) and the likely cause."""
    for index, score in enumerate(scores):
        if not math.isfinite(score):
            name = f"feature {index}" + (f" ({labels[index]!r})" if labels is not None else "")
            raise NonFiniteScoreError(f"{name} has score {score}: {_NON_FINITE_CAUSES}")


def normalize_scores(scores: Sequence[float], labels: Optional[Sequence[str]] = None) -> list[float]:
    """``score / max|score|``: sign kept, in [-1, 1]; all zeros stay zeros. A NaN/inf score raises
    ``NonFiniteScoreError`` (with ``labels``, the message names the feature's text)."""
    check_finite_scores(scores, labels)
    peak = max((abs(s) for s in scores), default=0.0)
    if peak == 0.0:
        return [0.0 for _ in scores]
    return [max(-1.0, min(1.0, s / peak)) for s in scores]


class AttributionResult(BaseModel):
    """One explanation: which features of ``prompt`` drove the model towards ``target``."""

    model_config = ConfigDict(ser_json_inf_nan="constants")  # see AttributionMetadata

    prompt: str
    target: str
    contrast_target: Optional[str] = Field(None, description="the answer the target was contrasted with, if any")
    target_span: Optional[tuple[int, int]] = Field(
        None, description="the characters of the target whose log-probability was explained (None: all of it)")
    counterfactual_prompt: Optional[str] = Field(
        None, description="for a counterfactual explanation: x' (its messages' contents joined by newlines)")
    method: Union[AttributionMethod, str] = Field(description="a built-in method, or the name of a registered one")
    granularity: Granularity
    attributions: list[TokenAttribution]
    matrix: Optional[AttributionMatrix] = None
    model_name: str = "unknown"
    metadata: AttributionMetadata = Field(default_factory=AttributionMetadata)
    messages: Optional[list[ChatMessage]] = Field(
        default=None, description="the chat messages explained (None for a raw prompt); features' offsets index them"
    )

    @field_validator("method", mode="before")
    @classmethod
    def _built_in_method(cls, value: Any) -> Any:
        """A built-in method's name becomes its enum member, so a result reloaded from JSON equals the original."""
        if isinstance(value, str) and not isinstance(value, AttributionMethod):
            try:
                return AttributionMethod(value)
            except ValueError:
                return value
        return value

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

    @property
    def method_name(self) -> str:
        """The method's name as a plain string, for built-in and user-registered methods alike."""
        return str(self.method)

    def get_top_k(self, k: int = 5, by_absolute: bool = True) -> list[TokenAttribution]:
        """The ``k`` strongest features, strongest first (by |score| unless ``by_absolute=False``)."""
        k = _count(k, "k")
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
            "method": self.method_name,
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

    def save_html(self, path: str | os.PathLike[str], show_scores: bool = False) -> Path:
        """Write the self-contained, escaped HTML view of this result (no CDN, no network); returns the path.
        ``show_scores`` prints each score under its word, for static exports."""
        return _facade().save_html(self, path, show_scores)

    def _repr_html_(self) -> str:
        """Notebook rendering: the coloured-text view as an HTML fragment."""
        return _facade().render_html(self, standalone=False)

    def show(self, top: int = 10) -> None:
        """Render the HTML view in a notebook; in a console print the ranked table (as ``fair-forge-explain``)."""
        _facade().show(self, top)

    def __repr__(self) -> str:
        top = ", ".join(f"{a.text.strip() or repr(a.text)}={a.score:+.3g}" for a in self.get_top_k(3))
        return (
            f"AttributionResult(method={self.method_name}, granularity={self.granularity}, "
            f"features={len(self.attributions)}, target={_short(self.target)}, top=[{top}])"
        )

    __str__ = __repr__


class BatchFailure(BaseModel):
    """An item of a batch that could not be explained, and why."""

    index: int
    error_type: str
    message: str


class AttributionBatchResult(BaseModel):
    """The results of ``explain_batch``: one result per item that worked, and the failures of the others."""

    model_config = ConfigDict(ser_json_inf_nan="constants")  # see AttributionMetadata

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

    # ---- files and tables (the dataset layout of ``runs/sinks.py``) -------------------------------------------

    def to_dataframe(self) -> Any:
        """The tidy long table of ``explain_dataset`` outputs: one row per feature, one per failure (needs pandas)."""
        return _facade().batch_dataframe(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to ``path``: JSONL (one result per line) or Parquet (the tidy table), by suffix."""
        return _facade().save_batch(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "AttributionBatchResult":
        """Read a file written by ``save`` or ``explain_dataset``, ordered by item index."""
        return _facade().load_batch(path)

    def __repr__(self) -> str:
        methods = sorted({r.method_name for r in self.results})
        return (
            f"AttributionBatchResult(results={len(self.results)}, failures={len(self.failures)}, "
            f"model={self.model_name}, methods={methods}, seconds={self.total_compute_time_seconds:.3g})"
        )

    __str__ = __repr__


def _count(value: Any, name: str) -> int:
    """A whole number >= 0 (numpy integers too; ``True`` and ``2.5`` are not counts), else InvalidInputError."""
    if isinstance(value, bool):
        raise InvalidInputError(f"{name} must be a whole number >= 0, got {value!r}")
    try:
        count = operator.index(value)
    except TypeError:
        raise InvalidInputError(f"{name} must be a whole number >= 0, got {value!r}") from None
    if count < 0:
        raise InvalidInputError(f"{name} must be >= 0, got {count}")
    return count


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _facade() -> Any:
    """The one deliberate upward import of ``core``: the result methods that render or store a result (``show``,
    ``save_html``, ``_repr_html_``, a batch's ``save``, ``load`` and ``to_dataframe``) hand the work to ``viz/`` and
    ``runs/`` through the package's facade (``_facade.py``), imported on first use, so that ``core`` itself imports
    neither (``core/audit.py``'s report reaches it through this function too). tests/test_layers.py allows exactly
    this arrow."""
    from .. import _facade

    return _facade
