"""AttributionExplainer: the user-facing API for causal LMs, and the ``compute_attributions`` one-liner."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from . import engine
from .errors import ContextLengthError, ExplainabilityError, InvalidInputError
from .generation import generate_target
from .items import batch_items, item_fields
from .methods import MethodContext, MethodSpec, RawAttribution, get_method
from .models import borrowed, check_model, display_name
from .prompt import Messages, ModelInput, build_model_input
from .scoring import ScoreKind, TargetScorer, model_context_length
from .segment import Feature, build_features, check_message_indices, restrict_to_messages
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
# seconds an explain() call runs before its progress bar appears: quick explanations print nothing
PROGRESS_DELAY = 10.0
GranularityLike = Union[str, Granularity]


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
class _Settings:
    """What every item of a call shares, validated once: the method, its parameters, granularity, per_target."""

    spec: MethodSpec
    params: dict[str, Any]
    granularity: Granularity
    per_target: bool
    attribute_messages: Optional[tuple[int, ...]] = None  # None: every message's text is attributable


@dataclass(frozen=True)
class _Request:
    """One tokenized item: everything checked, nothing computed yet."""

    model_input: ModelInput
    features: list[Feature]


class AttributionExplainer:
    """Explains which parts of the input drove a causal LM to a target response.

    ``score`` picks the explained quantity (sum of target log-probs by default, or "mean", or "prob");
    ``include_template_tokens`` makes chat-template tokens attributable too; ``batch_size`` caps the rows per
    model call (None: sized by a token and a logits budget, see ``scoring.rows_per_call``; a method's own
    ``batch_size`` parameter overrides it);
    ``prefix_cache`` runs the unchanging start of the input (system prompt, chat header) once per explanation.
    ``max_memory`` (bytes) bounds the activation memory of a model call, which sizes calls of long inputs (None: a
    fraction of the free memory, see ``memory.py``); ``checkpoint=True`` recomputes layers in the backward pass so
    that gradient calls keep a fraction of that memory, for one more forward per call; ``checkpoint=None`` (default)
    does so where one row's backward pass is estimated over that budget, and a result whose gradient calls ran
    checkpointed says so in its metadata (``checkpoint``, ``checkpoint_reason``); ``False`` never does.
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
        max_memory: Optional[int] = None,
        checkpoint: Optional[bool] = None,
    ) -> None:
        check_model(model)
        self.model = model
        self.tokenizer = tokenizer
        self.default_method = get_method(default_method).name
        self.default_granularity = parse_granularity(default_granularity)
        self.verbose = verbose
        config = getattr(model, "config", None)
        self.model_name = model_name or display_name(getattr(config, "name_or_path", None), type(model).__name__)
        TargetScorer(model, score=score, batch_size=batch_size, max_memory=max_memory, checkpoint=checkpoint)  # checks
        self.score = score
        self.batch_size = batch_size
        self.include_template_tokens = include_template_tokens
        self.prefix_cache = prefix_cache
        self.max_memory = max_memory
        self.checkpoint = checkpoint

    # ---- one explanation ----------------------------------------------------------------------------------------

    def explain(
        self,
        messages: Optional[Messages] = None,
        target: Optional[str] = None,
        *,
        prompt: Optional[str] = None,
        method: Optional[MethodLike] = None,
        granularity: Optional[GranularityLike] = None,
        per_target: bool = False,
        attribute_messages: Optional[Sequence[int]] = None,
        show_progress: bool = True,
        **method_params: Any,
    ) -> AttributionResult:
        """Attribute ``target`` to the features of ``messages`` (chat) or ``prompt`` (raw text).

        An explanation that takes longer than ``PROGRESS_DELAY`` seconds (many steps or samples, ``per_target``,
        a long document) shows a progress bar of its model requests unless ``show_progress=False``.
        ``per_target=True`` also returns a (target tokens x features) matrix. ``attribute_messages=[i, ...]``
        attributes to those messages only; the others (e.g. the question) stay as unperturbed context. Method parameters (``n_steps``,
        ``n_samples``, ``baseline``, ``noise_std``, ``seed``, ``batch_size``, ...) are passed as keywords.
        Without a ``target`` the model's own greedy answer is explained (``generation.generate_target``).
        """
        settings = self._settings(method, granularity, per_target, method_params, attribute_messages)
        if target is None:  # settings are checked before the model generates
            target = generate_target(self.model, self.tokenizer, messages=messages, prompt=prompt)
        request = self._prepare(messages, prompt, target, settings)
        from tqdm.auto import tqdm

        with tqdm(desc=f"explaining ({settings.spec.name})", unit="request", delay=PROGRESS_DELAY,
                  disable=not show_progress, leave=False) as progress:
            ((_, outcome),) = self._outcomes([request], settings, on_round=progress.update)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _settings(self, method: Optional[MethodLike], granularity: Optional[GranularityLike], per_target: bool,
                  method_params: Mapping[str, Any], attribute_messages: Optional[Sequence[int]] = None) -> _Settings:
        """The method and its validated parameters: every settings error is raised here, once, before any item."""
        spec = get_method(method if method is not None else self.default_method)
        scorer = TargetScorer(self.model)  # a typed error for a model without parameters
        params = spec.resolve_params(method_params, vocab_size=scorer.vocab_size)
        level = parse_granularity(granularity if granularity is not None else self.default_granularity)
        if spec.kind == "gradient":
            scorer.embedding_layer()  # typed error for models without input embeddings
        return _Settings(spec, params, level, bool(per_target), check_message_indices(attribute_messages))

    def _prepare(self, messages: Optional[Messages], prompt: Optional[str], target: Optional[str],
                 settings: _Settings) -> _Request:
        """Check and tokenize one item; raises typed errors before any model call."""
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
        model_input = restrict_to_messages(model_input, settings.attribute_messages)
        return _Request(model_input, build_features(model_input, settings.granularity))

    def _outcomes(self, requests: Iterable[Union[_Request, Exception]], settings: _Settings,
                  on_round: Callable[[], Any] = lambda: None) -> Iterator[tuple[int, Union[AttributionResult, Exception]]]:
        """Run prepared items through the batch engine (``engine.run``); (index, result or error) as items finish.

        The model is borrowed for the whole run; the items share one prefix cache (a dataset's system prompt runs
        once) and the rows-per-call cap (the method's ``batch_size``, else the explainer's).
        """
        batch_size = settings.params.get("batch_size") or self.batch_size
        prefixes: dict = {}
        in_flight: dict[int, _Request] = {}

        def jobs() -> Iterator[Union[engine.Job, engine.Rejected]]:
            for index, request in enumerate(requests):
                if isinstance(request, Exception):
                    yield engine.Rejected(index, request)
                    continue
                scorer = TargetScorer(self.model, score=self.score, batch_size=batch_size,
                                      prefix_cache=self.prefix_cache, prefixes=prefixes,
                                      max_memory=self.max_memory, checkpoint=self.checkpoint)
                context = MethodContext(scorer, request.model_input, request.features, dict(settings.params),
                                        settings.per_target)
                in_flight[index] = request
                yield engine.Job(index, request.model_input, scorer, settings.spec.plan(context))

        with borrowed(self.model):
            for finished in engine.run(jobs(), batch_size=batch_size, on_round=on_round):
                request = in_flight.pop(finished.index, None)
                if finished.error is not None:
                    yield finished.index, finished.error
                    continue
                try:
                    result: Union[AttributionResult, Exception] = self._result(
                        settings, request, finished.value, finished.job.scorer)
                except Exception as error:  # noqa: BLE001 - a malformed backend answer fails its item only
                    result = error
                yield finished.index, result

    def _result(self, settings: _Settings, request: _Request, raw: RawAttribution,
                scorer: TargetScorer) -> AttributionResult:
        spec = settings.spec
        if not isinstance(raw, RawAttribution):
            raise ExplainabilityError(f"method {spec.name} returned {type(raw).__name__}, not a RawAttribution")
        scores = np.asarray(raw.feature_scores, dtype=float).reshape(-1)
        if scores.shape[0] != len(request.features):
            raise ExplainabilityError(
                f"method {spec.name} returned {scores.shape[0]} scores for {len(request.features)} features"
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
            compute_time_seconds=scorer.count.seconds,
            n_forward_passes=scorer.count.forward_passes,
            n_backward_passes=scorer.count.backward_passes,
            n_tokens_processed=scorer.count.tokens_processed,
            method_params=dict(settings.params),
            score=self.score,
            n_features=len(request.features),
            n_target_tokens=request.model_input.n_target,
            **raw.metadata,
            **({"checkpoint": True, "checkpoint_reason": scorer.checkpoint_reason} if scorer.checkpoint_reason else {}),
        )
        if self.verbose:
            print(f"[fair_forge] {spec.name}: {len(scores)} features in {scorer.count.seconds:.2f}s")
        return AttributionResult(
            prompt=request.model_input.prompt,
            target=request.model_input.target,
            method=_method_label(spec.name),
            granularity=settings.granularity,
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
        attribute_messages: Optional[Sequence[int]] = None,
        **method_params: Any,
    ) -> AttributionBatchResult:
        """Explain every item; an item that fails is recorded in ``failures`` and the others still return.

        Items are ``(messages_or_prompt, target)`` pairs, dicts with ``messages`` or ``prompt`` (or ``question``,
        sent as one user message) and ``target`` (or ``answer``), or a pandas DataFrame with those columns.
        This is a pure map over items: an item's result depends only on the settings and the item. It collects
        ``iter_explain``: the batch engine runs a window of items together and packs their model calls (rows of
        similar length together; a system prompt shared by the items computed once), which gives the same scores
        as explaining them one by one up to float rounding, and bit-identical results on every run. An item's
        pass counts are the model calls its rows took part in; its ``compute_time_seconds`` is its share of those
        calls (in proportion to its rows) plus the time its method's own arithmetic took.
        """
        records = batch_items(items)
        started = time.perf_counter()
        progress = _progress(len(records), show_progress)
        outcomes: dict[int, Union[AttributionResult, BatchFailure]] = {}
        try:
            for index, outcome in self.iter_explain(records, method=method, granularity=granularity,
                                                    per_target=per_target, attribute_messages=attribute_messages,
                                                    **method_params):
                outcomes[index] = outcome
                progress.update(1)
        finally:
            progress.close()
        results = [outcomes[index] for index in sorted(outcomes) if isinstance(outcomes[index], AttributionResult)]
        return AttributionBatchResult(
            results=results,
            indices=[index for index in sorted(outcomes) if isinstance(outcomes[index], AttributionResult)],
            model_name=self.model_name,
            total_compute_time_seconds=time.perf_counter() - started,
            failures=[outcome for _, outcome in sorted(outcomes.items()) if isinstance(outcome, BatchFailure)],
        )

    def iter_explain(
        self,
        items: Iterable[Any],
        *,
        method: Optional[MethodLike] = None,
        granularity: Optional[GranularityLike] = None,
        per_target: bool = False,
        attribute_messages: Optional[Sequence[int]] = None,
        **method_params: Any,
    ) -> Iterator[tuple[int, Union[AttributionResult, BatchFailure]]]:
        """Stream ``(index, result or failure)`` over ``items`` (any iterable, read lazily), as items finish.

        Items are those of ``explain_batch``. Settings errors (unknown method, bad parameter) are raised before
        the first item is read; an item that fails yields a ``BatchFailure`` and the stream goes on. At most
        ``engine.ITEMS_IN_FLIGHT`` items are in flight at once, so items may finish out of input order.
        """
        settings = self._settings(method, granularity, per_target, method_params, attribute_messages)
        if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
            raise InvalidInputError("items must be an iterable of (messages_or_prompt, target) pairs or dicts")
        return self._stream(items, settings)

    def _stream(self, items: Iterable[Any], settings: _Settings
                ) -> Iterator[tuple[int, Union[AttributionResult, BatchFailure]]]:
        def prepared() -> Iterator[Union[_Request, Exception]]:
            for record in items:
                try:
                    messages, prompt, target = item_fields(record)
                    yield self._prepare(messages, prompt, target, settings)
                except Exception as error:  # noqa: BLE001 - recorded per item; nothing the user gave is lost
                    yield error

        for index, outcome in self._outcomes(prepared(), settings):
            if isinstance(outcome, Exception):
                yield index, BatchFailure(index=index, error_type=type(outcome).__name__, message=str(outcome))
            else:
                yield index, outcome

    # ---- display ----------------------------------------------------------------------------------------------

    def visualize(self, result: AttributionResult, return_html: bool = False) -> Optional[str]:
        """Show ``result`` as coloured text in a notebook, or return the (escaped, self-contained) HTML."""
        from .visualization import display_html, render_html

        if return_html:
            return render_html(result)
        return display_html(result)  # None in a notebook (displayed), else the HTML


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
