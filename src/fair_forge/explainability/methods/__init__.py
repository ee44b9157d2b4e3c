"""The method registry: built-in backends register themselves with a decorator, users add their own the same way.

A backend is a function ``run(context: MethodContext) -> RawAttribution``. It receives the scorer (the only way to
call the model), the tokenized input, the features to attribute to and its validated parameters, and returns one
score per feature (and optionally a target-token x feature matrix). It never sees the user's raw text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Optional, Union

import numpy as np

from ..errors import InvalidInputError, UnknownMethodError
from ..types import AttributionMethod

if TYPE_CHECKING:  # imported for annotations only, to keep this module free of model code
    from ..prompt import ModelInput
    from ..scoring import TargetScorer
    from ..segment import Feature

MethodKind = Literal["gradient", "perturbation"]


@dataclass
class MethodContext:
    """Everything a backend may use for one explanation."""

    scorer: "TargetScorer"
    model_input: "ModelInput"
    features: "list[Feature]"
    params: dict[str, Any]
    per_target: bool = False


@dataclass
class RawAttribution:
    """A backend's answer: ``feature_scores`` (n_features,), optional ``matrix`` (n_target_tokens, n_features)."""

    feature_scores: np.ndarray
    matrix: Optional[np.ndarray] = None
    metadata: dict[str, Any] = field(default_factory=dict)


Backend = Callable[[MethodContext], RawAttribution]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its backend, what kind of access it needs, and its parameters with defaults."""

    name: str
    kind: MethodKind
    run: Backend
    additive: bool
    defaults: Mapping[str, Any]
    description: str = ""

    def resolve_params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``given``; unknown names are an error that lists the accepted ones."""
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise InvalidInputError(
                f"{self.name} does not take parameter(s) {unknown}; it accepts {sorted(self.defaults)}"
            )
        params = {**self.defaults, **given}
        check_shared_params(params)
        return params


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_shared_params(params: Mapping[str, Any]) -> None:
    """Type and range checks for the parameter names shared across methods, so they fail before any model call."""
    if "n_steps" in params and not (_is_int(params["n_steps"]) and params["n_steps"] >= 1):
        raise InvalidInputError(f"n_steps must be a positive integer, got {params['n_steps']!r}")
    for name in ("n_samples", "batch_size"):  # None: the method picks (e.g. by feature count or memory)
        if params.get(name) is not None and not (_is_int(params[name]) and params[name] >= 1):
            raise InvalidInputError(f"{name} must be a positive integer or None, got {params[name]!r}")
    if "seed" in params and not _is_int(params["seed"]):
        raise InvalidInputError(f"seed must be an integer, got {params['seed']!r}")
    if "noise_std" in params:
        value = params["noise_std"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise InvalidInputError(f"noise_std must be a number >= 0, got {value!r}")
    if "baseline" in params:
        value = params["baseline"]
        if not (value in ("zero", "pad") or _is_int(value)):
            raise InvalidInputError(f"baseline must be 'zero', 'pad' or a token id, got {value!r}")


_REGISTRY: dict[str, MethodSpec] = {}


def method_name(method: Union[str, AttributionMethod]) -> str:
    """The registry key of ``method``: an enum member or its (case-insensitive) name or value."""
    if isinstance(method, AttributionMethod):
        return method.value
    if not isinstance(method, str):
        raise UnknownMethodError(f"method must be a string or AttributionMethod, got {type(method).__name__}")
    return method.strip().lower()


def register_method(
    name: Union[str, AttributionMethod],
    *,
    kind: MethodKind,
    additive: bool,
    defaults: Optional[Mapping[str, Any]] = None,
    description: str = "",
    replace: bool = False,
) -> Callable[[Backend], Backend]:
    """Decorator that registers ``run`` under ``name``.

    ``kind="gradient"`` backends may use the scorer's embedding-level calls and need a model with input embeddings;
    ``kind="perturbation"`` backends only score masked inputs. ``additive=True`` declares that feature scores add up
    (to f(input) - f(baseline)), which allows summing tokens into words and sentences.
    """
    key = method_name(name)

    def decorator(run: Backend) -> Backend:
        if key in _REGISTRY and not replace:
            raise ValueError(f"method {key!r} is already registered; pass replace=True to override it")
        _REGISTRY[key] = MethodSpec(key, kind, run, additive, dict(defaults or {}), description)
        return run

    return decorator


def get_method(method: Union[str, AttributionMethod]) -> MethodSpec:
    """The spec registered for ``method``, or a typed error naming the available ones."""
    _load_builtins()
    key = method_name(method)
    if key not in _REGISTRY:
        hint = ""
        if key == AttributionMethod.INTEGRATED_JACOBIANS.value:
            hint = " (integrated Jacobians explain siamese encoders: use SimilarityExplainer)"
        raise UnknownMethodError(f"unknown or unavailable method {key!r}{hint}; available: {available_methods()}")
    return _REGISTRY[key]


def available_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def _load_builtins() -> None:
    # Importing the built-in modules runs their @register_method decorators; done lazily to avoid import cycles.
    from . import gradient  # noqa: F401
    from . import perturbation  # noqa: F401
