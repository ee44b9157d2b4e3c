"""The model calls a method plans, their answers, and the state calls share: the vocabulary between the methods
(which ask) and the packer (which answers), so that neither needs the other.

A method asks with ``MaskedRows`` (token keep-masks over one input, answered with target log-probs),
``EmbeddingRows`` (attributable-token embeddings, answered with target log-probs and, if wanted, gradients) or
``TextRows`` (other token sequences with the same target), and with ``ByScorer`` has one of them answered by
another model. An input with a contrast target is answered with the
target's log-probs followed by the contrast's (n_target + n_contrast columns).
``RowScorer`` is what the packer needs of the scorer that owns a request's rows (``scorer.TargetScorer`` is one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np
import torch

EXPLAINED_SCORE = -1  # in EmbeddingRows.outputs: the explained score (else: a target token's index, its log-prob)
LOG_PROB_SUM = -2  # ... the sum of the target's log-probs (how a contrastive score's two sides are differentiated)


@dataclass
class EvaluationCount:
    """Model evaluations made so far: forward and backward passes, the tokens they processed, and the seconds of
    the calls (a packed call's time is shared among its inputs in proportion to their tokens)."""

    forward_passes: int = 0
    backward_passes: int = 0
    tokens_processed: int = 0
    seconds: float = 0.0

@dataclass(frozen=True)
class Prefix:
    """The model's key/value cache for the first ``length`` tokens, shared by every row of every call."""

    length: int
    cache: Any
    private: bool = False  # made for one call (cut from a shared cache): the call extends it instead of a copy


@dataclass(frozen=True)
class MaskedRows:
    """Score the input with the tokens where ``keep`` (n, L) is False masked: replaced by ``baseline_id``, or with
    ``remove=True`` deleted (kept tokens move right; freed slots leave attention and positions). Answer: (n, n_target)
    float64 target log-probs."""

    keep: np.ndarray
    baseline_id: int
    remove: bool = False


@dataclass(frozen=True)
class EmbeddingRows:
    """Score the input with the attributable tokens' embeddings replaced by ``embeds`` (n, A, H), A = the input's
    attributable tokens in order. ``outputs`` are the scalars whose gradient every row wants: ``EXPLAINED_SCORE``
    and/or target-token indices (their log-probs). Answer: ``EmbeddingAnswer``."""

    embeds: torch.Tensor
    outputs: tuple[int, ...] = (EXPLAINED_SCORE,)
    gradients: bool = True


@dataclass(frozen=True)
class EmbeddingAnswer:
    """(n, n_target) float64 target log-probs of the rows, and the (n, outputs, A, H) float32 gradients of each
    row's outputs w.r.t. its own embeddings (None when not asked for)."""

    log_probs: np.ndarray
    gradients: Optional[torch.Tensor]


@dataclass(frozen=True)
class TextRows:
    """Score whole other inputs of the same target (e.g. a counterfactual's compositions, each its own token
    sequence), unmasked. Answer: (n, n_target [+ n_contrast]) float64 target log-probs, one row per input."""

    inputs: tuple[Any, ...]  # ModelInput each (text/prompt.py)


@dataclass(frozen=True)
class ByScorer:
    """``request`` answered by ``scorer`` instead of the item's own: another model that reads the same token ids (a
    proxy model and the explained one, ``explainer.py``). Answer: ``request``'s."""

    scorer: "RowScorer"
    request: "MaskedRows | EmbeddingRows | TextRows"


Request = MaskedRows | EmbeddingRows | TextRows | ByScorer


class RowScorer(Protocol):
    """What the packer reads of the scorer that owns a request: the model, its budgets, its prefix caches, the
    teacher-forced call, the explained score and the count it adds its calls to."""

    model: Any
    device: torch.device
    max_memory: Optional[int]
    checkpoint: bool
    count: EvaluationCount
    contrast_function: Any  # the contrastive score's combine(a, b), None without a contrast

    @property
    def vocab_size(self) -> int: ...

    def prefix(self, input_ids: torch.Tensor, length: int) -> Optional[Prefix]: ...

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def target_log_probs(self, target_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor: ...

    def reduce(self, log_probs: torch.Tensor) -> torch.Tensor: ...

    def per_token(self, log_probs: torch.Tensor) -> torch.Tensor: ...
