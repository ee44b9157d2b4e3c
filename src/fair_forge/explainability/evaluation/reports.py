"""The reports ``faithfulness`` returns: plain pydantic data, saved and reloaded as JSON."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..core.types import AttributionMethod, Granularity
from ..errors import InvalidInputError

EditMode = Literal["remove", "replace"]
METRICS = ("comprehensiveness", "sufficiency", "deletion_auc", "insertion_auc")


class FaithfulnessScores(BaseModel):
    """The four metrics and the two curves of one feature order (or their mean / spread over orders or items)."""

    comprehensiveness: float
    sufficiency: float
    deletion_auc: float
    insertion_auc: float
    deletion_curve: list[float] = Field(description="f(x without top_k) at each curve fraction")
    insertion_curve: list[float] = Field(description="f(only top_k kept) at each curve fraction")


def _curve_metric_property(name: str) -> property:
    """A report's ``name`` curve metric of the explanation's ranking, as a read-only property."""

    def read(report: "FaithfulnessReport") -> float:
        return report._curve_metric(name)

    return property(read, doc=f"the explanation's {name} (``explanation.{name}``); an error when not computed")


class FaithfulnessReport(BaseModel):
    """How faithful one explanation is: its metrics, those of random orders, and what the check cost. The context
    metrics (top-k drop, LDS) are None unless ``metrics=`` asked for them; the curve metrics (``explanation``) are
    None when it named none of them."""

    model_config = ConfigDict(ser_json_inf_nan="constants")  # an undefined LDS (NaN) reloads as NaN

    method: Union[AttributionMethod, str]
    granularity: Granularity
    mode: EditMode
    score: str = Field(description="the explained quantity: 'sum', 'mean' or 'prob' (the explainer's score)")
    n_features: int
    fractions: list[float]
    curve_fractions: list[float]
    features_removed: list[int] = Field(description="k = ceil(fraction x n_features) at each of ``fractions``")
    curve_features: list[int] = Field(description="k at each of ``curve_fractions``")
    ranking: list[int] = Field(description="feature positions, most important first")
    full_score: float = Field(description="f(x): the explained score before any edit")
    empty_score: float = Field(description="f with every feature removed (or replaced)")
    metrics: list[str] = Field(default_factory=lambda: list(METRICS), description="the metrics computed")
    explanation: Optional[FaithfulnessScores] = Field(None, description="the curve metrics of the ranking")
    n_random: int
    seed: int
    random_mean: Optional[FaithfulnessScores] = None
    random_std: Optional[FaithfulnessScores] = None
    top_k: Optional[list[int]] = Field(None, description="the k of the top-k drop, as asked for")
    top_k_removed: Optional[list[int]] = Field(None, description="each k clipped to n_features: the features removed")
    top_k_drop: Optional[dict[int, float]] = Field(None, description="f(x) - f(x without the top k), keyed by k")
    random_top_k_drop: Optional[dict[int, float]] = Field(None, description="the same, mean over the random orders")
    n_ablations: Optional[int] = Field(None, description="random half-ablations of the LDS")
    lds: Optional[float] = Field(None, description="linear datamodeling score; NaN when undefined (see lds_note)")
    lds_note: Optional[str] = Field(None, description="why the LDS is undefined, when it is")
    n_forward_passes: int = 0
    n_tokens_processed: int = 0
    compute_time_seconds: float = Field(0.0, description="wall time of the call (of the whole batch, in a batch)")

    comprehensiveness = _curve_metric_property("comprehensiveness")
    sufficiency = _curve_metric_property("sufficiency")
    deletion_auc = _curve_metric_property("deletion_auc")
    insertion_auc = _curve_metric_property("insertion_auc")

    def _curve_metric(self, name: str) -> float:
        if self.explanation is None:
            raise InvalidInputError(f"{name} was not computed (metrics={self.metrics}): leave metrics=None or name it")
        return getattr(self.explanation, name)


class FaithfulnessBatchReport(BaseModel):
    """Per-item reports of a batch and their mean (curves averaged point by point over the shared fractions; top-k
    drops k by k; LDS over the items where it is defined)."""

    model_config = ConfigDict(ser_json_inf_nan="constants")  # see FaithfulnessReport

    reports: list[FaithfulnessReport]
    indices: list[int] = Field(description="item index of each report")
    mean: Optional[FaithfulnessScores] = Field(None, description="None when the curve metrics were not computed")
    random_mean: Optional[FaithfulnessScores] = None
    top_k_drop: Optional[dict[int, float]] = None
    random_top_k_drop: Optional[dict[int, float]] = None
    lds: Optional[float] = Field(None, description="mean LDS of the items where it is defined (NaN if none)")
    lds_items: Optional[int] = Field(None, description="how many items the mean LDS is over")
    compute_time_seconds: float = Field(0.0, description="wall time of the whole batch (items share model calls)")

    def __len__(self) -> int:
        return len(self.reports)
