"""AttributionExplainer: the user-facing API for causal LMs, and the ``compute_attributions`` one-liner."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union


from .runtime import engine
from .core.config import ExplainerConfig
from .errors import InvalidInputError
from .runtime.generation import generate_target
from .item_plan import Prepared, Settings, build_result, prepare, proxied_plan, scored_plan
from .methods.registry import MethodContext, get_method
from .runtime.models import borrowed, check_model, check_proxy, display_name
from .runtime.scorer import ScoreKind, TargetScorer
from .runtime.scores import get_score
from .text.items import batch_items, item_fields, item_options
from .text.prompt import Messages
from .text.segment import SENTENCE_PATTERN, check_message_indices
from .core.types import (
    AttributionBatchResult,
    AttributionMethod,
    AttributionResult,
    BatchFailure,
    Granularity,
)

MethodLike = Union[str, AttributionMethod]
DEFAULT_CONTRAST = "logprob_diff"
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


class AttributionExplainer:
    """Explains which parts of the input drove a causal LM to a target response.

    ``score`` picks the explained quantity (sum of target log-probs by default, or "mean", or "prob");
    ``include_template_tokens`` makes chat-template tokens attributable too; ``batch_size`` caps the rows per
    model call (None: sized by a token and a logits budget, see ``packer.rows_per_call``; a method's own
    ``batch_size`` parameter overrides it);
    ``prefix_cache`` runs the unchanging start of the input (system prompt, chat header) once per explanation.
    ``max_memory`` (bytes) bounds the activation memory of a model call, which sizes calls of long inputs (None: a
    fraction of the free memory, see ``memory.py``); ``checkpoint=True`` recomputes layers in the backward pass so
    that gradient calls keep a fraction of that memory, for one more forward per call; ``checkpoint=None`` (default)
    does so where one row's backward pass is estimated over that budget, and a result whose gradient calls ran
    checkpointed says so in its metadata (``checkpoint``, ``checkpoint_reason``); ``False`` never does.

    ``proxy_model`` (a smaller model of the same tokenizer and vocabulary; ``proxy_tokenizer``, if given, is checked
    against ``tokenizer``) scores the ablations of the perturbation methods instead of ``model``; then
    ``proxy_check_rows`` of them, drawn with the method's seed, are scored by ``model`` too, and
    ``metadata.proxy["lds"]`` is the two models' Spearman rank agreement on them.
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
        proxy_model: Any = None,
        proxy_tokenizer: Any = None,
        proxy_check_rows: int = 16,
    ) -> None:
        check_model(model)
        self.model = model
        self.tokenizer = tokenizer
        TargetScorer(model, score=score, batch_size=batch_size, max_memory=max_memory, checkpoint=checkpoint)  # checks
        if proxy_model is not None:
            check_proxy(model, tokenizer, proxy_model, proxy_tokenizer)
        if isinstance(proxy_check_rows, bool) or not isinstance(proxy_check_rows, int) or proxy_check_rows < 2:
            raise InvalidInputError(f"proxy_check_rows must be an integer >= 2 (a rank correlation needs two rows), "
                                    f"got {proxy_check_rows!r}")
        self.proxy_model = proxy_model
        self.config = ExplainerConfig(
            default_method=get_method(default_method).name,
            default_granularity=parse_granularity(default_granularity),
            model_name=model_name or _name_of(model), verbose=verbose, score=score, batch_size=batch_size,
            include_template_tokens=include_template_tokens, prefix_cache=prefix_cache, max_memory=max_memory,
            checkpoint=checkpoint, proxy_model_name=_name_of(proxy_model) if proxy_model is not None else None,
            proxy_check_rows=proxy_check_rows,
        )

    @classmethod
    def from_config(cls, model: Any, tokenizer: Any, config: ExplainerConfig,
                    proxy_model: Any = None) -> "AttributionExplainer":
        """An explainer of ``model`` with every option of ``config`` (how a Ray actor rebuilds the driver's); a
        config made with a proxy model needs that model again."""
        if (config.proxy_model_name is None) != (proxy_model is None):
            raise InvalidInputError(f"the explainer was built with proxy_model={config.proxy_model_name!r}: pass "
                                    "the same proxy_model to rebuild it")
        return cls(model, tokenizer, proxy_model=proxy_model, **config.options())

    # the options, read from the config (an explainer's options do not change after it is built)
    default_method = property(lambda self: self.config.default_method)
    default_granularity = property(lambda self: self.config.default_granularity)
    verbose = property(lambda self: self.config.verbose)
    model_name = property(lambda self: self.config.model_name)
    score = property(lambda self: self.config.score)
    batch_size = property(lambda self: self.config.batch_size)
    include_template_tokens = property(lambda self: self.config.include_template_tokens)
    prefix_cache = property(lambda self: self.config.prefix_cache)
    max_memory = property(lambda self: self.config.max_memory)
    checkpoint = property(lambda self: self.config.checkpoint)
    proxy_check_rows = property(lambda self: self.config.proxy_check_rows)

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
        contrast_target: Optional[str] = None,
        contrast: str = DEFAULT_CONTRAST,
        counterfactual: Optional[Union[Messages, str]] = None,
        target_span: Optional[tuple[int, int]] = None,
        **method_params: Any,
    ) -> AttributionResult:
        """Attribute ``target`` to the features of ``messages`` (chat) or ``prompt`` (raw text).

        ``contrast_target="No"`` explains why ``target`` rather than it: the explained score becomes
        log p(target) - log p(contrast) (``contrast="logprob_diff"``) or p(target) - p(contrast) (``"prob_diff"``,
        or a contrastive score registered in ``runtime/scores.py``). ``counterfactual=x_prime`` (messages with the
        same roles, or a prompt) explains f(x) - f(x'): the features are the segments where x and x' differ, each
        carrying the ``counterfactual_text`` it replaces; Shapley-type methods (kernel_shap) sum to the difference
        exactly, integrated gradients follows the path from x''s embeddings where the segments' token counts match.
        ``metadata.target_score`` is the explained score at the input (and ``counterfactual_score`` at x').
        ``target_span=(start, end)`` (character offsets into ``target``) explains the log-probability of the target
        tokens that hold those characters only, the rest of the answer staying as context: which source supports
        this sentence of the answer (see ``answer_sentences``).

        An explanation that takes longer than ``PROGRESS_DELAY`` seconds (many steps or samples, ``per_target``,
        a long document) shows a progress bar of its model requests unless ``show_progress=False``.
        ``per_target=True`` also returns a (target tokens x features) matrix. ``attribute_messages=[i, ...]``
        attributes to those messages only; the others (e.g. the question) stay as unperturbed context. Method parameters (``n_steps``,
        ``n_samples``, ``baseline``, ``noise_std``, ``seed``, ``batch_size``, ...) are passed as keywords.
        Without a ``target`` the model's own greedy answer is explained (``generation.generate_target``).
        """
        settings = self._settings(method, granularity, per_target, method_params, attribute_messages, contrast)
        if target is None:  # settings are checked before the model generates
            target = generate_target(self.model, self.tokenizer, messages=messages, prompt=prompt)
        request = prepare(self, settings, messages, prompt, target, contrast_target, counterfactual, target_span)
        from tqdm.auto import tqdm

        with tqdm(desc=f"explaining ({settings.spec.name})", unit="request", delay=PROGRESS_DELAY,
                  disable=not show_progress, leave=False) as progress:
            ((_, outcome),) = self._outcomes([request], settings, on_round=progress.update)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _settings(self, method: Optional[MethodLike], granularity: Optional[GranularityLike], per_target: bool,
                  method_params: Mapping[str, Any], attribute_messages: Optional[Sequence[int]] = None,
                  contrast: str = DEFAULT_CONTRAST) -> Settings:
        """The method and its validated parameters: every settings error is raised here, once, before any item."""
        spec = get_method(method if method is not None else self.default_method)
        scorer = TargetScorer(self.model)  # a typed error for a model without parameters
        params = spec.resolve_params(method_params, vocab_size=scorer.vocab_size)
        level = parse_granularity(granularity if granularity is not None else self.default_granularity)
        if spec.kind == "gradient":
            scorer.embedding_layer()  # typed error for models without input embeddings
            if self.proxy_model is not None:
                raise InvalidInputError(f"{spec.name} is a gradient method, and proxy_model scores ablations only: "
                                        "use a perturbation method, or an explainer without proxy_model")
        contrast = get_score(contrast, contrastive=True).name  # a typed error for an unknown contrast
        return Settings(spec, params, level, bool(per_target), check_message_indices(attribute_messages), contrast)

    def _outcomes(self, requests: Iterable[Union[Prepared, Exception]], settings: Settings,
                  on_round: Callable[[], Any] = lambda: None) -> Iterator[tuple[int, Union[AttributionResult, Exception]]]:
        """Run prepared items through the batch engine (``engine.run``); (index, result or error) as items finish.

        The model (and the proxy) is borrowed for the whole run; the items share one prefix cache per model (a dataset's system prompt runs
        once) and the rows-per-call cap (the method's ``batch_size``, else the explainer's).
        """
        batch_size = settings.params.get("batch_size") or self.batch_size
        prefixes: dict = {}  # the key/value caches of the model that answers the plans (the proxy, if any) ...
        explained_prefixes: dict = {}  # ... and of the explained model, which checks the proxy (caches differ per model)
        in_flight: dict[int, Prepared] = {}

        def jobs() -> Iterator[Union[engine.Job, engine.Rejected]]:
            for index, request in enumerate(requests):
                if isinstance(request, Exception):
                    yield engine.Rejected(index, request)
                    continue
                model_input = request.model_input
                answering = self.proxy_model if self.proxy_model is not None else self.model
                scorer = self._scorer(answering, prefixes, settings, model_input, batch_size)
                context = MethodContext(scorer, request.model_input, request.features, dict(settings.params),
                                        settings.per_target, request.counterfactual)
                plan = scored_plan(settings.spec, context)
                if self.proxy_model is not None:
                    explained = self._scorer(self.model, explained_prefixes, settings, model_input, batch_size)
                    plan = proxied_plan(plan, context, explained, self.proxy_check_rows, self.config.proxy_model_name)
                in_flight[index] = request
                yield engine.Job(index, model_input, scorer, plan)

        proxy = borrowed(self.proxy_model) if self.proxy_model is not None else contextlib.nullcontext()
        with borrowed(self.model), proxy:
            for finished in engine.run(jobs(), batch_size=batch_size, on_round=on_round):
                request = in_flight.pop(finished.index, None)
                if finished.error is not None:
                    yield finished.index, finished.error
                    continue
                try:
                    result: Union[AttributionResult, Exception] = build_result(
                        self, settings, request, finished.value, finished.job.scorer)
                except Exception as error:  # noqa: BLE001 - a malformed backend answer fails its item only
                    result = error
                yield finished.index, result

    def _scorer(self, model: Any, prefixes: dict, settings: Settings, model_input: Any,
                batch_size: Optional[int]) -> TargetScorer:
        """One item's scorer on ``model`` (the explained one or its proxy), with the explainer's options."""
        contrasted = model_input.contrast is not None
        return TargetScorer(model, score=self.score, batch_size=batch_size, prefix_cache=self.prefix_cache,
                            prefixes=prefixes, max_memory=self.max_memory, checkpoint=self.checkpoint,
                            contrast=settings.contrast if contrasted else None, contrast_length=model_input.n_contrast,
                            target_span=model_input.target_span)

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
        contrast: str = DEFAULT_CONTRAST,
        **method_params: Any,
    ) -> AttributionBatchResult:
        """Explain every item; an item that fails is recorded in ``failures`` and the others still return.

        Items are ``(messages_or_prompt, target)`` pairs, dicts with ``messages`` or ``prompt`` (or ``question``,
        sent as one user message) and ``target`` (or ``answer``), or a pandas DataFrame with those columns; a dict
        (a row) may also give a ``contrast_target`` and a ``counterfactual`` (see ``explain``).
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
                                                    contrast=contrast, **method_params):
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
        contrast: str = DEFAULT_CONTRAST,
        **method_params: Any,
    ) -> Iterator[tuple[int, Union[AttributionResult, BatchFailure]]]:
        """Stream ``(index, result or failure)`` over ``items`` (any iterable, read lazily), as items finish.

        Items are those of ``explain_batch``. Settings errors (unknown method, bad parameter) are raised before
        the first item is read; an item that fails yields a ``BatchFailure`` and the stream goes on. At most
        ``engine.ITEMS_IN_FLIGHT`` items are in flight at once, so items may finish out of input order.
        """
        settings = self._settings(method, granularity, per_target, method_params, attribute_messages, contrast)
        if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
            raise InvalidInputError("items must be an iterable of (messages_or_prompt, target) pairs or dicts")
        return self._stream(items, settings)

    def _stream(self, items: Iterable[Any], settings: Settings
                ) -> Iterator[tuple[int, Union[AttributionResult, BatchFailure]]]:
        def prepared() -> Iterator[Union[Prepared, Exception]]:
            for record in items:
                try:
                    messages, prompt, target = item_fields(record)
                    yield prepare(self, settings, messages, prompt, target, **item_options(record))
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
        from .viz.html import display_html, render_html

        if return_html:
            return render_html(result)
        return display_html(result)  # None in a notebook (displayed), else the HTML


def _name_of(model: Any) -> str:
    """A model's name for results (``display_name`` of its config's name or path, else its class name)."""
    return display_name(getattr(getattr(model, "config", None), "name_or_path", None), type(model).__name__)


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


def answer_sentences(
    explainer: AttributionExplainer,
    messages: Optional[Messages] = None,
    answer: Optional[str] = None,
    *,
    prompt: Optional[str] = None,
    method: Optional[MethodLike] = None,
    granularity: Optional[GranularityLike] = None,
    show_progress: bool = False,
    **method_params: Any,
) -> AttributionBatchResult:
    """Attribute every sentence of ``answer`` on its own, in one packed run: which source supports which claim.

    Each result explains the log-probability of one sentence's tokens (``target_span``), the whole answer staying
    as context, in reading order of the sentences (``result.target_span`` says which).
    """
    if not isinstance(answer, str) or not answer.strip():
        raise InvalidInputError("answer must be the non-empty text whose sentences are attributed")
    spans = [(match.start() + len(text) - len(text.lstrip()), match.end() - len(text) + len(text.rstrip()))
             for match in SENTENCE_PATTERN.finditer(answer) if (text := match.group()).strip()]
    source = {"messages": messages} if messages is not None else {"prompt": prompt}
    items = [{**source, "target": answer, "target_span": span} for span in spans]
    return explainer.explain_batch(items, method=method, granularity=granularity, show_progress=show_progress,
                                   **method_params)
