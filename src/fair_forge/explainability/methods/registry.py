"""The method registry: built-in backends register themselves with a decorator, users add their own the same way.

A backend is either a *plan*, a generator function ``plan(context)`` that yields the model calls it needs
(``requests.MaskedRows``, ``requests.EmbeddingRows``), receives their answers and returns a ``RawAttribution`` (the
batch engine packs the calls of many items), or a plain function ``run(context) -> RawAttribution`` that calls the
model itself through ``context.scorer`` (run alone, unpacked). Either way it sees the tokenized input, the
features to attribute to and its validated parameters, never the user's raw text.

Parameters are pydantic models (``MethodParams`` subclasses, ``extra="forbid"``): types, ranges, defaults and
cross-field rules are checked once, before any item runs; the docs' parameter tables are rendered from them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import UnionType
from typing import (TYPE_CHECKING, Annotated, Any, Callable, Generator, Literal, Mapping, Optional, Union, get_args,
                    get_origin)

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from ..core.plans import drive
from ..errors import BudgetError, InvalidInputError, UnknownMethodError
from .coalitions import DEFAULT_MAX_EVALUATIONS
from ..core.types import AttributionMethod

if TYPE_CHECKING:  # imported for annotations only, to keep this module free of model code
    from ..text.prompt import ModelInput
    from ..runtime.scorer import TargetScorer
    from ..text.counterfactual_input import CounterfactualInput
    from ..text.segment import Feature

MethodKind = Literal["gradient", "perturbation"]
METHOD_KINDS: tuple[str, ...] = ("gradient", "perturbation")
SEED_LIMIT = 2**32


@dataclass
class MethodContext:
    """Everything a backend may use for one explanation."""

    scorer: "TargetScorer"
    model_input: "ModelInput"
    features: "list[Feature]"
    params: dict[str, Any]
    per_target: bool = False
    counterfactual: "Optional[CounterfactualInput]" = None  # explain f(x) - f(x'): features are x''s differences


@dataclass
class RawAttribution:
    """A backend's answer: ``feature_scores`` (n_features,), optional ``matrix`` (n_target_tokens, n_features)."""

    feature_scores: np.ndarray
    matrix: Optional[np.ndarray] = None
    metadata: dict[str, Any] = field(default_factory=dict)


Backend = Callable[[MethodContext], Any]  # a plan (generator function) or a plain run function
Plan = Generator[Any, Any, RawAttribution]


# ---- parameter types shared by the methods' models ------------------------------------------------------------------


def _integer(value: Any) -> Any:
    """Integers (numpy's too) pass as int; bools and floats are refused rather than silently converted."""
    if isinstance(value, (bool, np.bool_)) or isinstance(value, float):
        raise ValueError(f"must be an integer, got {value!r}")
    return int(value) if isinstance(value, np.integer) else value


def _seed(value: Any) -> Optional[int]:
    """None (fresh randomness) or an integer in [0, 2**32): the one rule, and the message says both."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and 0 <= value < SEED_LIMIT:
        return int(value)
    raise ValueError("must be None (fresh randomness) or an integer in [0, 2**32)")


Count = Annotated[int, BeforeValidator(_integer), Field(ge=1, strict=True)]
TokenId = Annotated[int, BeforeValidator(_integer), Field(ge=0, strict=True)]
Seed = Annotated[Optional[int], BeforeValidator(_seed)]
Flag = Annotated[bool, Field(strict=True)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class MethodParams(BaseModel):
    """Parameters every method takes; subclasses add their own. Frozen, unknown names refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: Optional[Count] = Field(
        None, description="rows per model call; None: as many as the token and logits budgets allow (packed)")

    def planned_evaluations(self) -> int:
        """Model evaluations these settings need for any item, known before seeing one (0: depends on the item)."""
        return 0


class SampledParams(MethodParams):
    """Parameters of methods that draw random samples within an evaluation budget."""

    seed: Seed = Field(0, description="seed of the method's own generator, in [0, 2**32); None: fresh randomness")
    max_evaluations: Count = Field(
        DEFAULT_MAX_EVALUATIONS, description="refuse (BudgetError) explanations that would need more model evaluations")


# ---- the registry ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its backend, what kind of access it needs, and its parameter model."""

    name: str
    kind: MethodKind
    backend: Backend
    additive: bool
    params: type[BaseModel]
    description: str = ""

    @property
    def defaults(self) -> dict[str, Any]:
        """Every parameter with its default."""
        return {name: info.get_default(call_default_factory=True) for name, info in self.params.model_fields.items()}

    def resolve_params(self, given: Mapping[str, Any], vocab_size: Optional[int] = None) -> dict[str, Any]:
        """``given`` validated by the method's model, defaults filled in; a typed error that says what is wrong.

        With ``vocab_size``, a token-id ``baseline`` must lie in the model's vocabulary.
        """
        unknown = sorted(set(given) - set(self.params.model_fields))
        if unknown:
            raise InvalidInputError(
                f"{self.name} does not take parameter(s) {unknown}; it accepts {sorted(self.params.model_fields)}")
        try:
            model = self.params.model_validate(dict(given))
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in issue['loc']) or 'parameters'}: "
                f"{issue['msg'].removeprefix('Value error, ')} "
                f"(got {issue.get('input')!r})" for issue in error.errors())
            raise InvalidInputError(f"{self.name}: {problems}") from None
        params = model.model_dump()
        planned, budget = getattr(model, "planned_evaluations", lambda: 0)(), params.get("max_evaluations")
        if isinstance(budget, int) and planned > budget:
            raise BudgetError(f"{self.name} would need {planned} model evaluations, more than max_evaluations="
                              f"{budget}; lower the steps or samples, or raise max_evaluations")
        baseline = params.get("baseline")
        if vocab_size is not None and isinstance(baseline, int) and baseline >= vocab_size:
            raise InvalidInputError(
                f"{self.name}: baseline token id {baseline} is outside the model's vocabulary of {vocab_size} tokens")
        return params

    def plan(self, context: MethodContext) -> Plan:
        """The backend as a plan: a plan backend's own generator, or a plain one run at once (asking for nothing)."""
        if inspect.isgeneratorfunction(self.backend):
            return self.backend(context)
        return _run_alone(self.backend, context)

    def run(self, context: MethodContext) -> RawAttribution:
        """Run the backend alone, its requests answered one at a time by ``context.scorer``."""
        from ..runtime.answers import answer_requests

        batch_size = context.params.get("batch_size") or context.scorer.batch_size

        def answer(request: Any) -> Any:
            (reply,) = answer_requests([(context.scorer, context.model_input, request)], batch_size)
            return reply

        return drive(self.plan(context), answer)


def _run_alone(run: Backend, context: MethodContext) -> Plan:
    """A plain backend as a plan that asks for nothing: it calls the model itself through its scorer."""
    yield from ()
    return run(context)


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
    params: Optional[type[MethodParams]] = None,
    defaults: Optional[Mapping[str, Any]] = None,
    description: str = "",
    replace: bool = False,
) -> Callable[[Backend], Backend]:
    """Decorator that registers a backend (a plan generator function or a plain ``run`` function) under ``name``.

    ``kind="gradient"`` backends use embedding rows and need a model with input embeddings; ``kind="perturbation"``
    backends only score masked inputs. ``additive=True`` declares that feature scores add up (to f(input) -
    f(baseline)), which allows summing tokens into words and sentences. Parameters: a ``params`` model, or
    ``defaults`` (name -> default, any type; unknown names are refused).
    """
    key = method_name(name)
    if kind not in METHOD_KINDS:
        raise InvalidInputError(f"kind must be one of {METHOD_KINDS}, got {kind!r}")
    if not isinstance(additive, bool):
        raise InvalidInputError(f"additive must be True or False, got {additive!r}")
    if params is not None and defaults is not None:
        raise InvalidInputError("give either params (a model) or defaults (a dict), not both")
    model = params or create_model(
        f"{key}_params", __config__=ConfigDict(extra="forbid", frozen=True),
        **{name: (Any, value) for name, value in (defaults or {}).items()})

    def decorator(backend: Backend) -> Backend:
        if key in _REGISTRY and not replace:
            raise ValueError(f"method {key!r} is already registered; pass replace=True to override it")
        _REGISTRY[key] = MethodSpec(key, kind, backend, additive, model, description)
        return backend

    return decorator


def get_method(method: Union[str, AttributionMethod]) -> MethodSpec:
    """The spec registered for ``method``, or a typed error naming the available ones."""
    key = method_name(method)
    if key not in _REGISTRY:
        hint = ""
        if key == AttributionMethod.INTEGRATED_JACOBIANS.value:
            hint = " (integrated Jacobians explain siamese encoders: use SimilarityExplainer)"
        raise UnknownMethodError(f"unknown or unavailable method {key!r}{hint}; available: {available_methods()}")
    return _REGISTRY[key]


def available_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_REGISTRY)


def parameter_table(model: type[BaseModel]) -> str:
    """A markdown table of a parameter model's fields: name, type, default, meaning (what docs/methods.md shows)."""
    lines = ["| parameter | type | default | meaning |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        kind = _type_name(info.annotation) + _bounds(info.metadata)
        default = repr(info.get_default(call_default_factory=True))
        lines.append(f"| `{name}` | {kind} | `{default}` | {info.description or ''} |")
    return "\n".join(lines)


def _bounds(metadata: Any) -> str:
    """`` (>= 1)``-style text for the range constraints among a field's metadata."""
    symbols = ((">=", "ge"), (">", "gt"), ("<", "lt"), ("<=", "le"))
    items = [part for item in metadata for part in (item.metadata if isinstance(item, FieldInfo) else [item])]
    bounds = [f"{symbol} {value}" for item in items for symbol, attribute in symbols
              if (value := getattr(item, attribute, None)) is not None]
    return f" ({', '.join(bounds)})" if bounds else ""


def _type_name(annotation: Any) -> str:
    """A short readable name of a parameter's type (``int (>= 1) or None``, ``'zero' or 'pad' or int (>= 0)``)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0]) + _bounds(args[1:])
    if origin is Literal:
        return " or ".join(repr(value) for value in args)
    if origin is Union or isinstance(annotation, UnionType):
        return " or ".join("None" if arg is type(None) else _type_name(arg) for arg in args)
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def methods_reference() -> str:
    """The parameter tables of every built-in method, in docs/methods.md's "Parameters" section."""
    sections = []
    for name in available_methods():
        spec = get_method(name)
        if spec.params.__module__.startswith(f"{__package__}."):
            sections.append(f"### `{name}`\n\n{spec.description}\n\n{parameter_table(spec.params)}\n")
    return "\n".join(sections)
