"""A counterfactual as the explainer's input: x and x' aligned, their differences as features, and the token
sequence of every subset of them.

``explain(x, target, counterfactual=x_prime)`` explains f(x) - f(x'). The features are the differences
(``counterfactual.align``, grown to sentences at SENTENCE granularity); everything else is held at x. A feature mask
(True: the difference keeps x's text) names one text, ``counterfactual.compose``; ``inputs`` tokenizes each one as
``build_model_input`` tokenizes any input, so perturbation methods score real texts, never spliced token ids. A
path method (integrated gradients) needs x' as token embeddings at x's positions: ``baseline_ids`` when every
difference has as many tokens in x' as in x, else ``baseline_problem`` says why not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ..core.types import Granularity
from .counterfactual import Alignment, align, compose, difference_token_positions, expand_differences
from .prompt import ModelInput, build_model_input
from .segment import Feature


@dataclass(frozen=True)
class CounterfactualInput:
    """x, x' and the differences between them, ready for a method (``MethodContext.counterfactual``)."""

    alignment: Alignment
    model_input: ModelInput  # x, only the tokens of a difference attributable
    counterfactual_input: ModelInput  # x'
    features: tuple[Feature, ...]  # one per difference, in reading order
    tokenizer: Any
    include_template_tokens: bool
    baseline_ids: Optional[torch.Tensor]  # (A,) x''s tokens at x's attributable positions, if they line up
    baseline_problem: str = ""  # why they do not

    @property
    def counterfactual_texts(self) -> list[str]:
        """The text of x' that each feature replaces ("" where x' deletes it)."""
        return [difference.counterfactual_text for difference in self.alignment.differences]

    def inputs(self, masks: np.ndarray) -> tuple[ModelInput, ...]:
        """The input of every feature mask row (True: the difference keeps x's text, False: it takes x''s)."""
        return tuple(self._input(row) for row in np.asarray(masks, dtype=bool))

    def _input(self, keep: Sequence[bool]) -> ModelInput:
        composed = compose(self.alignment, [bool(k) for k in keep])
        main = self.model_input
        return build_model_input(
            self.tokenizer, target=main.target, messages=composed.messages, prompt=composed.prompt,
            include_template_tokens=self.include_template_tokens,
            contrast_target=main.contrast.target if main.contrast is not None else None)


def counterfactual_input(
    tokenizer: Any, original: Union[str, Sequence[dict[str, str]]], counterfactual: Any, *, target: str,
    granularity: Granularity, contrast_target: Optional[str] = None, include_template_tokens: bool = False,
) -> CounterfactualInput:
    """Align x (``original``: a prompt or messages) with x' and tokenize both; typed errors for inputs that differ
    in kind, message count or roles, that are identical, or that cannot be aligned (``counterfactual.align``)."""
    alignment = expand_differences(align(original, counterfactual), granularity)
    n = len(alignment.differences)

    def tokenized(keep: bool) -> ModelInput:
        composed = compose(alignment, [keep] * n)
        return build_model_input(tokenizer, target=target, messages=composed.messages, prompt=composed.prompt,
                                 include_template_tokens=include_template_tokens, contrast_target=contrast_target)

    x, x_prime = tokenized(True), tokenized(False)
    spans = compose(alignment, [True] * n).spans
    positions = difference_token_positions(x, spans)
    features = tuple(
        Feature(difference.text, tokens, difference.start, difference.end, difference.message_index)
        for difference, tokens in zip(alignment.differences, positions))
    attributable = np.zeros(x.length, dtype=bool)
    for tokens in positions:
        attributable[list(tokens)] = True
    x = dataclasses.replace(x, attributable=attributable)
    baseline, problem = _lined_up(x, x_prime, attributable)
    return CounterfactualInput(alignment, x, x_prime, features, tokenizer, include_template_tokens, baseline, problem)


def _lined_up(x: ModelInput, x_prime: ModelInput, attributable: np.ndarray) -> tuple[Optional[torch.Tensor], str]:
    """x''s token ids at x's attributable positions, when x' is x with only those tokens changed (every difference
    has as many tokens on both sides), else None and the reason."""
    if x_prime.length != x.length or x_prime.target_start != x.target_start:
        return None, (f"x has {x.target_start} prompt tokens and x' has {x_prime.target_start}: the differing "
                      "segments tokenize to different numbers of tokens, so there is no straight path between their "
                      "embeddings; use a perturbation method (kernel_shap, occlusion, lime) or give x' with "
                      "replacements of the same token length")
    changed = (x.input_ids != x_prime.input_ids).numpy()
    if bool((changed & ~attributable).any()):
        return None, ("x and x' tokenize differently outside the differing segments (a tokenizer merges across "
                      "them), so x' is not x with the differing tokens replaced; use a perturbation method")
    positions = np.flatnonzero(attributable)
    return x_prime.input_ids[positions].clone(), ""
