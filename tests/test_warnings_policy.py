"""The suite's warning policy (tests/conftest.py): a deprecated call made by the library fails the test."""

from __future__ import annotations

import warnings

import pytest
from transformers import GPT2LMHeadModel
from zoo import build_zoo_model

from fair_forge.explainability import AttributionExplainer


class DeprecatingGPT2(GPT2LMHeadModel):
    """A model whose forward warns like a library deprecating an argument its caller passed."""

    def forward(self, *args, **kwargs):
        warnings.warn("this argument is deprecated", FutureWarning, stacklevel=2)
        return super().forward(*args, **kwargs)


def test_a_deprecation_raised_in_a_call_by_the_library_fails() -> None:
    zoo_model = build_zoo_model("gpt2")
    zoo_model.model.__class__ = DeprecatingGPT2
    explainer = AttributionExplainer(zoo_model.model, zoo_model.tokenizer)
    # "always": the engine retries a failed packed call item by item, and under the default action the retry's
    # warning (same location) would be swallowed by the warnings registry
    with warnings.catch_warnings(), pytest.raises(FutureWarning, match="deprecated call made by fair_forge: this "
                                                                        "argument is deprecated"):
        warnings.simplefilter("always", FutureWarning)
        explainer.explain(**zoo_model.example, method="occlusion")
