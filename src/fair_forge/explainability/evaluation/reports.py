"""The reports ``faithfulness`` returns: plain pydantic data, saved and reloaded as JSON."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, Field

from ..core.types import AttributionMethod, Granularity

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


class FaithfulnessReport(BaseModel):
    """How faithful one explanation is: its metrics, those of random orders, and what the check cost."""

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
    explanation: FaithfulnessScores
    n_random: int
    seed: int
    random_mean: Optional[FaithfulnessScores] = None
    random_std: Optional[FaithfulnessScores] = None
    n_forward_passes: int = 0
    n_tokens_processed: int = 0
    compute_time_seconds: float = Field(0.0, description="wall time of the call (of the whole batch, in a batch)")

    @property
    def comprehensiveness(self) -> float:
        return self.explanation.comprehensiveness

    @property
    def sufficiency(self) -> float:
        return self.explanation.sufficiency

    @property
    def deletion_auc(self) -> float:
        return self.explanation.deletion_auc

    @property
    def insertion_auc(self) -> float:
        return self.explanation.insertion_auc


class FaithfulnessBatchReport(BaseModel):
    """Per-item reports of a batch and their mean (curves averaged point by point over the shared fractions)."""

    reports: list[FaithfulnessReport]
    indices: list[int] = Field(description="item index of each report")
    mean: FaithfulnessScores
    random_mean: Optional[FaithfulnessScores] = None
    compute_time_seconds: float = Field(0.0, description="wall time of the whole batch (items share model calls)")

    def __len__(self) -> int:
        return len(self.reports)
