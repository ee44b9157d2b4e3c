"""AttributionExplainer: the user-facing API for causal LMs, and the ``compute_attributions`` one-liner."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from .errors import ContextLengthError, ExplainabilityError, InvalidInputError
from .methods import MethodContext, MethodSpec, RawAttribution, get_method
from .methods.gradient import TOKENS_PER_BATCH
from .models import borrowed, check_model, display_name
from .packing import PACKED_ITEMS, Coordinator
from .prompt import ModelInput, build_model_input
from .scoring import ScoreKind, TargetScorer, model_context_length
from .segment import Feature, build_features
from .types import (
    AttributionBatchResult,
    AttributionMatrix,
    AttributionMetadata,
    AttributionMethod,
    AttributionResult,
    BatchFailure,
    Granularity,
    TokenAttribution,
    normalize_scores,
)

MethodLike = Union[str, AttributionMethod]
GranularityLike = Union[str, Granularity]
Messages = Sequence[Mapping[str, str]]


def parse_granularity(granularity: GranularityLike) -> Granularity:
    """``Granularity`` from an enum member or its name/value; a typed error otherwise."""
    if isinstance(granularity, Granularity):
        return granularity
    if isinstance(granularity, str):
        try:
            return Granularity(granularity.strip().lower())
        except ValueError:
            pass
    raise InvalidInputError(f"unknown granularity {granularity!r}; use one of {[g.value for g in Granularity]}")


def _method_label(name: str) -> Union[AttributionMethod, str]:
    """The enum member for a built-in method, the plain name for a user-registered one."""
    try:
        return AttributionMethod(name)
    except ValueError:
        return name


@dataclass(frozen=True)
class _Request:
    """One validated explanation request: everything checked, nothing computed yet."""

    spec: MethodSpec
    params: dict[str, Any]
    granularity: Granularity
    model_input: ModelInput
    features: list[Feature]


class AttributionExplainer:
    """Explains which parts of the input drove a causal LM to a target response.

    ``score`` picks the explained quantity (sum of target log-probs by default, or "mean", or "prob");
    ``include_template_tokens`` makes chat-template tokens attributable too; ``batch_size`` is the number of
    sequences per model call for perturbation methods (None: sized by a token and a logits budget, see
    ``scoring.masked_rows_per_call``; gradient methods take their own ``batch_size`` parameter);
    ``prefix_cache`` runs the unchanging start of the input (system prompt, chat header) once per explanation.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        default_method: MethodLike = AttributionMethod.INTEGRATED_GRADIENTS,
        default_granularity: GranularityLike = Granularity.WORD,
        verbose: bool = False,
        *,
        model_name: Optional[str] = None,
        score: ScoreKind = "sum",
        batch_size: Optional[int] = None,
        include_template_tokens: bool = False,
        prefix_cache: bool = True,
    ) -> None:
        check_model(model)
        self.model = model
        self.tokenizer = tokenizer
        self.default_method = get_method(default_method).name
        self.default_granularity = parse_granularity(default_granularity)
        self.verbose = verbose
        config = getattr(model, "config", None)
        self.model_name = model_name or display_name(getattr(config, "name_or_path", None), type(model).__name__)
        TargetScorer(model, score=score, batch_size=batch_size)  # validates score and batch_size now
        self.score = score
        self.batch_size = batch_size
        self.include_template_tokens = include_template_tokens
        self.prefix_cache = prefix_cache

    # ---- one explanation --------------------------------------------------------------------------------------

    def explain(
        self,
        messages: Optional[Messages] = None,
        target: Optional[str] = None,
        *,
        prompt: Optional[str] = None,
        method: Optional[MethodLike] = None,
        granularity: Optional[GranularityLike] = None,
        per_target: bool = False,
        **method_params: Any,
    ) -> AttributionResult:
        """Attribute ``target`` to the features of ``messages`` (chat) or ``prompt`` (raw text).

        ``per_target=True`` also returns a (target tokens x features) matrix. Method parameters (``n_steps``,
        ``n_samples``, ``baseline``, ``noise_std``, ``seed``, ``batch_size``, ...) are passed as keywords.
        """
        request = self._prepare(messages, prompt, target, method, granularity, method_params)
        with borrowed(self.model):
            return self._run(request, per_target)

    def _prepare(
        self,
        messages: Optional[Messages],
        prompt: Optional[str],
        target: Optional[str],
        method: Optional[MethodLike],
        granularity: Optional[GranularityLike],
        method_params: Mapping[str, Any],
    ) -> _Request:
        """Validate everything and tokenize; raises typed errors before any model call."""
        spec = get_method(method if method is not None else self.default_method)
        params = spec.resolve_params(method_params)
        level = parse_granularity(granularity if granularity is not None else self.default_granularity)
        if target is None:
            raise InvalidInputError("target is required: the response text to explain")
        model_input = build_model_input(
            self.tokenizer,
            target=target,
            messages=messages,
            prompt=prompt,
            include_template_tokens=self.include_template_tokens,
        )
        limit = model_context_length(self.model)
        if limit is not None and model_input.length > limit:
            raise ContextLengthError(
                f"prompt + target are {model_input.length} tokens but the model takes at most {limit}; "
                "shorten the prompt or the target"
            )
        features = build_features(model_input, level)
        if spec.kind == "gradient":
            TargetScorer(self.model).embedding_layer()  # typed error for models without input embeddings
        return _Request(spec, params, level, model_input, features)

    def _run(self, request: _Request, per_target: bool, scorer: Optional[TargetScorer] = None) -> AttributionResult:
        """Run the request's method; the caller borrows the model (see ``models.borrowed``)."""
        if scorer is None:
            scorer = TargetScorer(self.model, score=self.score, batch_size=self.batch_size,
                                  prefix_cache=self.prefix_cache)
        context = MethodContext(scorer, request.model_input, request.features, request.params, per_target)
        started = time.perf_counter()
        raw = request.spec.run(context)
        elapsed = time.perf_counter() - started
        return self._result(request, raw, scorer, elapsed)

    def _result(self, request: _Request, raw: RawAttribution, scorer: TargetScorer, elapsed: float) -> AttributionResult:
        scores = np.asarray(raw.feature_scores, dtype=float).reshape(-1)
        if scores.shape[0] != len(request.features):
            raise ExplainabilityError(
                f"method {request.spec.name} returned {scores.shape[0]} scores for {len(request.features)} features"
            )
        normalized = normalize_scores(scores.tolist())
        attributions = [
            TokenAttribution(
                text=feature.text,
                score=float(score),
                position=index,
                normalized_score=norm,
                start=feature.start,
                end=feature.end,
                message_index=feature.message_index,
                token_positions=list(feature.token_positions),
            )
            for index, (feature, score, norm) in enumerate(zip(request.features, scores, normalized))
        ]
        matrix = None
        if raw.matrix is not None:
            matrix = AttributionMatrix(
                row_labels=request.model_input.target_labels,
                column_labels=[f.text for f in request.features],
                values=np.asarray(raw.matrix, dtype=float).tolist(),
            )
        metadata = AttributionMetadata(
            compute_time_seconds=elapsed,
            n_forward_passes=scorer.count.forward_passes,
            n_backward_passes=scorer.count.backward_passes,
            n_tokens_processed=scorer.count.tokens_processed,
            method_params=dict(request.params),
            score=self.score,
            n_features=len(request.features),
            n_target_tokens=request.model_input.n_target,
            **raw.metadata,
        )
        if self.verbose:
            print(f"[fair_forge] {request.spec.name}: {len(scores)} features in {elapsed:.2f}s")
        return AttributionResult(
            prompt=request.model_input.prompt,
            target=request.model_input.target,
            method=_method_label(request.spec.name),
            granularity=request.granularity,
            attributions=attributions,
            matrix=matrix,
            model_name=self.model_name,
            metadata=metadata,
            messages=request.model_input.messages,
        )

    # ---- many explanations ------------------------------------------------------------------------------------

    def explain_batch(
        self,
        items: Any,
        *,
        method: Optional[MethodLike] = None,
        granularity: Optional[GranularityLike] = None,
        per_target: bool = False,
        show_progress: bool = True,
        **method_params: Any,
    ) -> AttributionBatchResult:
        """Explain every item; an item that fails is recorded in ``failures`` and the others still return.

        Items are ``(messages_or_prompt, target)`` pairs, dicts with ``messages`` or ``prompt`` (or ``question``,
        sent as one user message) and ``target`` (or ``answer``), or a pandas DataFrame with those columns.
        This is a pure map over items: an item's result depends only on the settings and the item. Underneath, up
        to ``PACKED_ITEMS`` items are explained side by side and their model inputs packed into shared model calls
        (``packing.py``: masked rows, or embedding rows with their gradients; rows of similar length together; a
        system prompt shared by the items computed once), which gives the same scores as explaining them one by
        one up to float rounding. An item's ``compute_time_seconds`` is then the time it was in flight and its pass
        counts are the model calls its rows took part in.
        """
        spec = get_method(method if method is not None else self.default_method)
        params = spec.resolve_params(method_params)  # parameter errors concern every item: raise them once, now
        level = parse_granularity(granularity if granularity is not None else self.default_granularity)
        records = _records(items)
        started = time.perf_counter()
        requests: dict[int, _Request] = {}
        errors: dict[int, BaseException] = {}
        for index, record in enumerate(records):  # every item checked and tokenized before any model call
            try:
                messages, prompt, target = _item_fields(record)
                requests[index] = self._prepare(messages, prompt, target, spec.name, level, method_params)
            except Exception as error:  # noqa: BLE001 - recorded per item; nothing the user gave is lost
                errors[index] = error
        progress = _progress(len(records), show_progress)
        progress.update(len(errors))
        coordinator = self._coordinator(spec, params, requests.values())
        order = list(requests)
        tasks = [
            partial(self._run, requests[index], per_target,
                    coordinator.scorer(self.model, score=self.score, prefix_cache=self.prefix_cache))
            for index in order
        ]
        with borrowed(self.model):
            outcomes = dict(zip(order, coordinator.run(tasks, on_done=lambda _: progress.update(1))))
        progress.close()
        outcomes.update((index, (False, error)) for index, error in errors.items())
        results: list[AttributionResult] = []
        indices: list[int] = []
        failures: list[BatchFailure] = []
        for index in sorted(outcomes):
            ok, value = outcomes[index]
            if ok:
                results.append(value)
                indices.append(index)
            else:
                failures.append(BatchFailure(index=index, error_type=type(value).__name__, message=str(value)))
        return AttributionBatchResult(
            results=results,
            indices=indices,
            model_name=self.model_name,
            total_compute_time_seconds=time.perf_counter() - started,
            failures=failures,
        )

    def iter_explain(
        self,
        items: Iterable[Any],
        *,
        method: Optional[MethodLike] = None,
        granularity: Optional[GranularityLike] = None,
        per_target: bool = False,
        **method_params: Any,
    ) -> Iterator[tuple[int, Union[AttributionResult, BatchFailure]]]:
        """Stream ``(index, result or failure)`` over ``items`` (any iterable, read lazily), as items finish.

        Items are those of ``explain_batch``. Settings errors (unknown method, bad parameter) are raised before
        the first item is read; an item that fails yields a ``BatchFailure`` and the stream goes on.
        """
        spec = get_method(method if method is not None else self.default_method)
        spec.resolve_params(method_params)
        level = parse_granularity(granularity if granularity is not None else self.default_granularity)
        if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
            raise InvalidInputError("items must be an iterable of (messages_or_prompt, target) pairs or dicts")
        for index, record in enumerate(items):
            try:
                messages, prompt, target = _item_fields(record)
                request = self._prepare(messages, prompt, target, spec.name, level, method_params)
                with borrowed(self.model):
                    result: Union[AttributionResult, BatchFailure] = self._run(request, per_target)
            except Exception as error:  # noqa: BLE001 - recorded per item; nothing the user gave is lost
                result = BatchFailure(index=index, error_type=type(error).__name__, message=str(error))
            yield index, result

    def _coordinator(self, spec: MethodSpec, params: Mapping[str, Any], requests: Iterable[_Request]) -> Coordinator:
        """The packer for one batch: masked rows per call as for one item; gradient rows per forward + backward pass
        as many as the method's batches hold (``batch_size`` rows of the longest item, or its token budget)."""
        rows = params.get("batch_size")
        if spec.kind == "gradient" and rows is not None:
            tokens = int(rows) * max((request.model_input.length for request in requests), default=1)
        else:
            tokens = TOKENS_PER_BATCH
        masked_rows = rows if spec.kind == "perturbation" and rows is not None else self.batch_size
        return Coordinator(batch_size=masked_rows, max_workers=PACKED_ITEMS, tokens_per_call=tokens)

    # ---- display ----------------------------------------------------------------------------------------------

    def visualize(self, result: AttributionResult, return_html: bool = False) -> Optional[str]:
        """Show ``result`` as coloured text in a notebook, or return the (escaped, self-contained) HTML."""
        from .visualization import display_html, render_html

        if return_html:
            return render_html(result)
        return display_html(result)  # None in a notebook (displayed), else the HTML


def _records(items: Any) -> list[Any]:
    """The items of a list/iterable, or the rows of a pandas DataFrame as dicts."""
    if hasattr(items, "to_dict") and hasattr(items, "columns"):
        return items.to_dict(orient="records")
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
        raise InvalidInputError("items must be a list of (messages_or_prompt, target) pairs or dicts, or a DataFrame")
    return list(items)


def _item_fields(item: Any) -> tuple[Optional[Messages], Optional[str], Any]:
    """(messages, prompt, target) of one batch item; a typed error for an item of the wrong shape."""
    if isinstance(item, Mapping):
        target = item.get("target", item.get("answer"))
        if "messages" in item:
            return item["messages"], None, target
        if "prompt" in item:
            return None, item["prompt"], target
        if "question" in item:
            return [{"role": "user", "content": item["question"]}], None, target
        raise InvalidInputError(f"item needs 'messages', 'prompt' or 'question', got keys {sorted(item)}")
    if isinstance(item, (tuple, list)) and len(item) == 2:
        source, target = item
        if isinstance(source, str):
            return None, source, target
        return source, None, target
    raise InvalidInputError(f"item must be a (messages_or_prompt, target) pair or a dict, got {item!r}")


def _progress(total: int, show: bool) -> Any:
    """A tqdm bar over ``total`` items (silent with ``show=False``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="explaining", unit="item", disable=not show)


def compute_attributions(
    model: Any,
    tokenizer: Any,
    messages: Optional[Messages] = None,
    target: Optional[str] = None,
    method: MethodLike = AttributionMethod.INTEGRATED_GRADIENTS,
    granularity: GranularityLike = Granularity.WORD,
    *,
    prompt: Optional[str] = None,
    **method_params: Any,
) -> AttributionResult:
    """One call: build an explainer and explain ``target`` given ``messages`` (or ``prompt``)."""
    explainer = AttributionExplainer(model, tokenizer)
    return explainer.explain(
        messages, target, prompt=prompt, method=method, granularity=granularity, **method_params
    )
