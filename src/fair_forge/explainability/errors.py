"""The project's exceptions: one root, a few kinds a caller may want to tell apart.

Input errors also derive from ``ValueError`` so code that already catches ``ValueError`` keeps working.
"""

from __future__ import annotations


class ExplainabilityError(Exception):
    """Root of every error raised on purpose by fair_forge.explainability."""


class InvalidInputError(ExplainabilityError, ValueError):
    """The user's input (messages, prompt, target, parameters) cannot be explained as given."""


class UnknownMethodError(InvalidInputError):
    """A method name that is not registered (the message names the available ones)."""


class ContextLengthError(InvalidInputError):
    """Prompt plus target do not fit in the model's context window."""


class NoAttributableFeaturesError(InvalidInputError):
    """The input has nothing to attribute to (e.g. every message is whitespace)."""


class BudgetError(InvalidInputError):
    """The asked computation is too large for the method (e.g. exact Shapley values over many features)."""


class UnsupportedModelError(ExplainabilityError):
    """The model lacks something the method needs (input embeddings, a supported dtype on this device, ...)."""


class ModelLoadError(ExplainabilityError):
    """An embedded default model could not be found or converted."""


class ConvergenceWarning(UserWarning):
    """A numerical estimate (e.g. integrated gradients' path integral) ended above its error tolerance."""
