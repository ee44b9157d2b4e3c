"""TargetScorer and the packer: teacher-forced log p(target_t | prefix), the one way the library calls the model.

A method asks for model calls with two small requests: ``MaskedRows`` (token keep-masks over one input, answered
with target log-probs) and ``EmbeddingRows`` (attributable-token embeddings, answered with target log-probs and,
if wanted, the gradient of one scalar per row). ``score_row_requests`` and ``score_embedding_requests`` answer the
requests of one or many inputs in shared, budgeted model calls; ``rows_per_call`` is the one place that decides how
many rows a call holds. Only the logits of the positions that predict target tokens are computed
(``logits_to_keep``) and they never leave the model's device: only (rows, n_target) floats come back.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Iterator, Literal, Optional, Sequence, TypeVar

import numpy as np
import torch

from .errors import InvalidInputError, ProbabilityUnderflowWarning, UnsupportedModelError
from .memory import CallEstimate, call_estimate, check_max_memory, checkpointed_layers, memory_budget
from .memory import rows_per_call as rows_within_budget
from .prompt import ModelInput

ScoreKind = Literal["sum", "mean", "prob"]
T = TypeVar("T")
SCORE_KINDS: tuple[str, ...] = ("sum", "mean", "prob")
# batch_size=None sizes every call by budgets (read at call time, see ``rows_per_call``): no-grad calls hold at most
# MASKED_TOKENS_PER_CALL tokens after the cached prefix (on 2 CPU threads 64 rows of 20 tokens ran LIME 1.29x faster
# than 16 rows, and 128 rows no faster than 64; SmolLM2, demo input); forward + backward calls hold at most
# GRADIENT_TOKENS_PER_CALL tokens. Both hold at most LOGITS_PER_CALL float32 logits (rows x (n_target + 1) x vocab,
# 128 MB); a backward pass keeps about GRADIENT_LOGITS_COPIES such tensors alive (logits, log-softmax, their grads).
# On the CPU a call of a thousand tokens is already compute-bound, so gradient calls there hold at most
# MASKED_TOKENS_PER_CALL tokens too: rows of 1,360 tokens (SmolLM2, checkpoint=True, 2 threads) took 8.0 s each at one
# row per call and 7.9 s at three, while the process grew by 1.4 GB against 2.5 GB (glibc's heap keeps the freed
# blocks of the layers recomputed in the backward pass: about 3x what the call holds at once).
MASKED_TOKENS_PER_CALL = 1024
GRADIENT_TOKENS_PER_CALL = 4096
LOGITS_PER_CALL = 2**25
GRADIENT_LOGITS_COPIES = 4
# Per-row prefix reuse: a masked row equals the input up to its first masked token, so it continues the unmasked
# input's key/value cache from there. Used when a request's rows (after the shared prefix) are at least this long:
# such calls hold few rows, while shorter rows gain more from sharing calls with the rows of other inputs (per-row
# reuse ties each row to its own input's cache, so rows of different inputs no longer share a call).
ROW_REUSE_MIN_WIDTH = 256
EXPLAINED_SCORE = -1  # in EmbeddingRows.outputs: the explained score (else: a target token's index, its log-prob)


@dataclass
class EvaluationCount:
    """Model evaluations made so far: forward and backward passes, the tokens they processed, and the seconds of
    the calls (a packed call's time is shared among its inputs in proportion to their tokens)."""

    forward_passes: int = 0
    backward_passes: int = 0
    tokens_processed: int = 0
    seconds: float = 0.0


def warn_if_probability_underflows(log_probability: torch.Tensor) -> None:
    """score="prob" is exp(sum of log-probs): below the dtype's smallest normal number it is 0 or imprecise, and so
    are the scores and gradients built on it. Say so instead of returning zero attributions silently."""
    floor = math.log(torch.finfo(log_probability.dtype).tiny)
    if bool((log_probability.detach() < floor).any()):
        warnings.warn(
            f"score='prob': the target's probability underflows {log_probability.dtype} (log p < {floor:.0f}) for "
            "some inputs, so their scores and gradients are 0 and the attributions lose them; use score='sum' "
            "(the log-probability) or a shorter target",
            ProbabilityUnderflowWarning,
            stacklevel=2,
        )


def model_context_length(model: Any) -> Optional[int]:
    """The model's maximum sequence length from its config, if it states one."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _output_layer(model: Any) -> Optional[torch.nn.Module]:
    """The model's output (vocabulary) layer, if it exposes one through ``get_output_embeddings``."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, torch.nn.Module) else None


def cache_argument(model: Any) -> str:
    """The name ``model.forward`` takes its key/value cache under: ``cache`` from transformers 5.24 on (the old
    name is deprecated there), ``past_key_values`` before. A wrapper that passes ``**kwargs`` on gets the installed
    transformers' name."""
    parameters = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@contextlib.contextmanager
def contiguous_head_input(model: Any) -> Iterator[None]:
    """Hand the output layer a contiguous input while the model runs.

    With ``logits_to_keep`` the model slices the last positions of every row before its output layer; for more
    than one row that slice is strided, and torch runs a strided 3-d input through a vocab-sized linear layer as a
    batched matmul over a broadcast weight: 5.6x slower than on a contiguous copy (forward + backward, SmolLM2's
    576 x 49152 head, 10 rows, 1 thread), about a third of an integrated-gradients call. Same values either way.
    """
    head = _output_layer(model)
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda module, args: tuple(
        a.contiguous() if isinstance(a, torch.Tensor) else a for a in args))
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class Prefix:
    """The model's key/value cache for the first ``length`` tokens, shared by every row of every call."""

    length: int
    cache: Any
    private: bool = False  # made for one call (cut from a shared cache): the call extends it instead of a copy


# ---- requests: the model calls a method plans ---------------------------------------------------------------------


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
    """(n, n_target) float64 target log-probs of the rows, and the (n, outputs, A, H) gradients of each row's outputs
    w.r.t. its own embeddings, in the scorer's ``score_dtype`` (None when not asked for)."""

    log_probs: np.ndarray
    gradients: Optional[torch.Tensor]


Request = MaskedRows | EmbeddingRows


class TargetScorer:
    """Scores the target of a ``ModelInput`` under masked ids or perturbed embeddings, and counts what it cost.

    ``score`` is the explained quantity: the sum of target-token log-probs (default), their mean, or the
    probability of the whole target (exp of the sum). With ``prefix_cache`` (default), the tokens before the first
    one a call varies (system prompt, chat header) go through the model once and their key/value cache is reused
    by every row; models whose forward returns no cache are scored without it. ``prefixes`` shares those caches
    between scorers (the items of one batch). ``batch_size`` caps the rows per model call (None: budgets).
    ``max_memory`` is the activation-memory budget of a call in bytes (None: a fraction of the free memory, see
    ``memory.memory_budget``); ``checkpoint=True`` runs gradient calls with checkpointed layers (``memory.py``), which
    keep a fraction of the memory for one more forward per call, and without the prefix cache; ``checkpoint=None``
    (default) does so once one row's backward pass is estimated over that budget (``checkpoints``), ``False`` never.
    """

    def __init__(
        self, model: Any, *, score: ScoreKind = "sum", batch_size: Optional[int] = None, prefix_cache: bool = True,
        prefixes: Optional[dict[tuple[int, ...], Optional[Prefix]]] = None, max_memory: Optional[int] = None,
        checkpoint: Optional[bool] = None,
    ) -> None:
        if score not in SCORE_KINDS:
            raise InvalidInputError(f"score must be one of {SCORE_KINDS}, got {score!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise InvalidInputError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        self.model = model
        self.score = score
        self.batch_size = batch_size
        self.count = EvaluationCount()
        parameter = next(model.parameters(), None)
        if parameter is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no parameters: it is not a language model")
        self.device, self.dtype = parameter.device, parameter.dtype
        # log-probs, input embeddings and gradients: float32, or the model's dtype where it is wider (float64), so
        # that a float64 model is scored in float64 throughout
        self.score_dtype = torch.promote_types(self.dtype, torch.float32)
        forward_parameters = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in forward_parameters
        self._cache_argument = cache_argument(model)
        self.prefix_cache = prefix_cache
        self._prefixes = {} if prefixes is None else prefixes
        self.max_memory = check_max_memory(max_memory)
        if checkpoint is not None and not isinstance(checkpoint, bool):
            raise InvalidInputError(f"checkpoint must be True, False or None (automatic), got {checkpoint!r}")
        self.checkpoint = checkpoint
        self.checkpoint_reason: Optional[str] = None  # why gradient calls ran checkpointed (None: they did not)

    def checkpoints(self, length: int, prefix: int, n_target: int) -> bool:
        """Whether a gradient call over rows of ``length`` tokens after a ``prefix``-token cache runs checkpointed
        layers: as ``checkpoint`` says, or with ``checkpoint=None`` when one such row's backward pass is estimated
        (``memory.call_estimate``) over the call budget (``max_memory``, or its default) and checkpointing would
        keep less: instead of a ``MemoryBudgetWarning`` and a call over budget. Once on, it stays on for this
        scorer's later calls (one explanation runs one way); the reason is kept in ``checkpoint_reason`` for the
        result's metadata."""
        if self.checkpoint is not None or self.checkpoint_reason is not None:
            if self.checkpoint:
                self.checkpoint_reason = "checkpoint=True"
            return self.checkpoint is not False
        try:
            estimate = call_estimate(self.model, length=length, prefix=prefix, n_target=n_target, grad=True)
        except InvalidInputError:  # no sizes in the config: no estimate, as for the call budgets
            return False
        budget = memory_budget(self.model, self.max_memory)
        lighter = call_estimate(self.model, length=length, prefix=prefix, n_target=n_target, checkpoint=True)
        if estimate.bytes_per_row <= budget or lighter.bytes_per_row >= estimate.bytes_per_row:
            return False  # within budget, or a model too shallow for checkpointing to keep less
        self.checkpoint_reason = (
            f"automatic: one row of {length} tokens after a {prefix}-token prefix needs about "
            f"{estimate.bytes_per_row / 2**30:.2f} GiB for a backward pass, over the call budget of "
            f"{budget / 2**30:.2f} GiB (max_memory)")
        return True

    @property
    def vocab_size(self) -> int:
        """Rows of the output layer (the logits' last dimension), from the config or the output embeddings."""
        value = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if isinstance(value, int) and value > 0:
            return value
        weight = getattr(_output_layer(self.model), "weight", None)
        return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else 1

    def reduce(self, log_probs: torch.Tensor) -> torch.Tensor:
        """(..., n_target) target log-probs -> (...) explained score."""
        if self.score == "sum":
            return log_probs.sum(-1)
        if self.score == "mean":
            return log_probs.mean(-1)
        total = log_probs.sum(-1)
        warn_if_probability_underflows(total)
        return total.exp()

    # ---- the model call ---------------------------------------------------------------------------------------

    def embedding_layer(self) -> torch.nn.Module:
        """The model's input embedding layer, or a typed error for models that do not expose one."""
        getter = getattr(self.model, "get_input_embeddings", None)
        layer = getter() if callable(getter) else None
        if layer is None:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} exposes no input embeddings (get_input_embeddings()); gradient methods "
                "need them: use a perturbation method (occlusion, lime, kernel_shap, sobol) instead"
            )
        return layer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ``input_ids`` (no gradient), on the model's device, in ``score_dtype`` (float32, or
        float64 for a float64 model)."""
        with torch.no_grad():
            return self.embedding_layer()(input_ids.to(self.device)).to(self.score_dtype)

    def prefix(self, input_ids: torch.Tensor, length: int) -> Optional[Prefix]:
        """The cached first ``length`` tokens of ``input_ids`` (computed once, by the first scorer that needs it),
        or None without caching."""
        if not self.prefix_cache or length < 1:
            return None
        key = tuple(input_ids[:length].tolist())
        if key not in self._prefixes:
            kwargs = {"logits_to_keep": 1} if self._keeps_logits else {}  # the prefix's logits are never used
            started = time.perf_counter()
            with torch.inference_mode(False), torch.no_grad():  # plain tensors: gradient calls will attend to them
                output = self.model(input_ids=input_ids[:length].unsqueeze(0).to(self.device), use_cache=True, **kwargs)
            self.count.forward_passes += 1
            self.count.tokens_processed += length
            self.count.seconds += time.perf_counter() - started
            cache = getattr(output, "cache", None)
            if cache is None:
                cache = getattr(output, "past_key_values", None)
            usable = cache is not None and hasattr(cache, "batch_repeat_interleave")
            self._prefixes[key] = Prefix(length, cache) if usable else None
        return self._prefixes[key]

    def target_log_probs(
        self,
        target_ids: torch.Tensor,
        *,
        input_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        prefix: Optional[Prefix] = None,
        count: bool = True,
    ) -> torch.Tensor:
        """(B, n_target) log p(target_t | prefix), in ``score_dtype``, for a batch whose sequences end with
        ``target_ids``.

        Give ``input_ids`` (B, L) or ``inputs_embeds`` (B, L, H); gradients flow through ``inputs_embeds``.
        ``target_ids`` is (n_target,) for every row or (B, n_target) per row. With a ``prefix``, the batch holds only
        the tokens after it. With an ``attention_mask`` (B, [prefix +] L) (0 for padding or removed tokens),
        position ids count only attended tokens. ``count=False`` leaves the counting to the caller.
        """
        n_target = int(target_ids.shape[-1])
        batch = input_ids if input_ids is not None else inputs_embeds
        size, length = int(batch.shape[0]), int(batch.shape[1])
        kwargs: dict[str, Any] = {"use_cache": False}
        if prefix is not None:
            cache = prefix.cache if prefix.private else copy.deepcopy(prefix.cache)  # the forward appends to it
            cache.batch_repeat_interleave(size)
            kwargs.update({"use_cache": True, self._cache_argument: cache})
        if input_ids is not None:
            kwargs["input_ids"] = input_ids.to(self.device)
        else:
            kwargs["inputs_embeds"] = inputs_embeds.to(device=self.device, dtype=self.dtype)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
            kwargs["attention_mask"] = attention_mask
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        if self._keeps_logits:
            kwargs["logits_to_keep"] = n_target + 1
        try:
            with contiguous_head_input(self.model):
                logits = self.model(**kwargs).logits
        except RuntimeError as error:
            if self.dtype == torch.float16 and self.device.type == "cpu":
                raise UnsupportedModelError(
                    "float16 models do not run reliably on the CPU; convert with model.float() or "
                    "model.to(torch.bfloat16), or run on a GPU"
                ) from error
            raise
        if count:
            self.count.forward_passes += 1
            self.count.tokens_processed += size * length
        logits = logits[:, -(n_target + 1) : -1].to(self.score_dtype)  # positions that predict the target tokens
        targets = target_ids.to(self.device).reshape(-1, n_target, 1).expand(size, n_target, 1)
        return logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(-1)

    def score_embeddings(self, target_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                         prefix: Optional[Prefix] = None) -> torch.Tensor:
        """(B,) explained score of rows of input embeddings (after ``prefix``), differentiable w.r.t. them."""
        return self.reduce(self.target_log_probs(target_ids, inputs_embeds=inputs_embeds, prefix=prefix))

    def score_token_masks(
        self,
        model_input: ModelInput,
        keep: np.ndarray,
        *,
        baseline_id: Optional[int] = None,
        remove: bool = False,
        per_target: bool = False,
        batch_size: Optional[int] = None,
    ) -> np.ndarray:
        """Score ``model_input`` with the tokens where ``keep`` (n, L) is False masked out, right away.

        For backends that call the model themselves (user-registered ``run(context)`` functions): a ``MaskedRows``
        request answered alone, ``batch_size`` rows per call (default: the scorer's). Returns (n,) explained scores,
        or (n, n_target) target log-probs with ``per_target=True``.
        """
        baseline = model_input.baseline_token_id if baseline_id is None else int(baseline_id)
        request = MaskedRows(np.asarray(keep, dtype=bool), baseline, remove)
        (log_probs,) = score_row_requests([(self, model_input, request)], batch_size or self.batch_size)
        return log_probs if per_target else self.reduce(torch.from_numpy(log_probs)).numpy()


# ---- the packer: many inputs' rows in budgeted model calls -----------------------------------------------------------


def rows_per_call(width: int, n_target: int, vocab_size: int, *, gradients: bool,
                  batch_size: Optional[int] = None, cpu: bool = False) -> int:
    """Rows of ``width`` tokens (after the cached prefix) per model call: ``batch_size`` if given, else what the
    token budget and the logits budget allow (see the budgets at the top of this module; ``cpu``: the model runs on
    the CPU), at least one."""
    if batch_size is not None:
        return batch_size
    tokens = GRADIENT_TOKENS_PER_CALL if gradients and not cpu else MASKED_TOKENS_PER_CALL
    logits = LOGITS_PER_CALL // GRADIENT_LOGITS_COPIES if gradients else LOGITS_PER_CALL
    return max(1, min(tokens // max(width, 1), logits // ((n_target + 1) * vocab_size)))


@dataclass(frozen=True)
class _Rows:
    """One request's rows, laid out for the model: what follows the prefix, ready to be right-aligned in a call.

    Masked rows hold their whole sequence (``ids``, ``attention``) and, in ``cached``, how many of its first tokens
    come from the prefix cache (the shared prefix's length, or with per-row reuse each row's first masked position);
    a row computes only the rest.
    """

    scorer: TargetScorer
    prefix: Optional[Prefix]
    target_ids: torch.Tensor
    ids: Optional[torch.Tensor] = None  # (L,) the input's token ids, masked where ...
    keep: Optional[torch.Tensor] = None  # ... (n, L) is False: replaced by ...
    baseline_id: int = 0  # ... this token, or
    remove: bool = False  # ... deleted (built one row at a time: memory stays with the call, not the request)
    cached: Optional[np.ndarray] = None  # (n,) leading tokens of each masked row read from the prefix cache
    base: Optional[torch.Tensor] = None  # (l, H) embeddings of the tokens after the prefix, whose ...
    positions: Optional[torch.Tensor] = None  # ... attributable positions (relative to the prefix) take ...
    embeds: Optional[torch.Tensor] = None  # ... (n, A, H) embeddings
    outputs: tuple[int, ...] = ()  # the scalars every row differentiates
    checkpoint: bool = False  # gradient calls run checkpointed layers (and then have no prefix cache)

    @property
    def size(self) -> int:
        return int((self.keep if self.keep is not None else self.embeds).shape[0])

    def cached_length(self, row: int) -> int:
        """Tokens of ``row`` read from the prefix cache."""
        if self.cached is not None:
            return int(self.cached[row])
        return self.prefix.length if self.prefix is not None else 0

    def width(self, row: int) -> int:
        """Tokens ``row`` computes (after the cache)."""
        if self.ids is not None:
            return int(self.ids.shape[0]) - self.cached_length(row)
        return int(self.base.shape[0])

    def token_row(self, row: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Masked row ``row`` after its cached tokens: its token ids and, with ``remove``, its attention (0 for
        removed tokens, which move left so that the kept ones stay in order and the last kept one predicts the first
        target token)."""
        own = self.cached_length(row)
        kept, ids = self.keep[row, own:], self.ids[own:]
        if self.remove:
            order = torch.sort(kept.long(), stable=True).indices
            return ids[order], kept.long()[order]
        return torch.where(kept, ids, torch.full_like(ids, self.baseline_id)), None


def _masked_rows(scorer: TargetScorer, model_input: ModelInput, request: MaskedRows) -> tuple[_Rows, np.ndarray]:
    """The distinct rows of a masked request after their shared prefix, and each original row's distinct index."""
    keep = np.asarray(request.keep, dtype=bool)
    if keep.ndim != 2 or keep.shape[1] != model_input.length:
        raise InvalidInputError(f"keep must have shape (n, {model_input.length}), got {keep.shape}")
    if not keep[:, model_input.target_start :].all():
        raise InvalidInputError("target tokens cannot be masked")
    unique, inverse = np.unique(keep, axis=0, return_inverse=True)
    ids = model_input.input_ids
    # tokens before the first attributable (and first masked) one are the same in every row of every call
    varied = np.flatnonzero(~unique.all(axis=0))
    start = min(np.flatnonzero(model_input.attributable)[:1].tolist() + varied[:1].tolist() + [model_input.target_start])
    last = model_input.target_start - 1  # the token predicting the first target: every row computes it
    reuse = model_input.length - start >= ROW_REUSE_MIN_WIDTH and last > start
    prefix = scorer.prefix(ids, last if reuse else start)  # with reuse: the unmasked input's cache up to ``last``
    if prefix is not None and reuse:  # each row continues it from its first masked token ...
        first_masked = np.where(unique.all(axis=1), model_input.length, (~unique).argmax(axis=1))
        if request.remove:  # ... and computes its last kept prompt token, which predicts the first target
            prompt = unique[:, : model_input.target_start]
            last = np.where(prompt.any(axis=1), last - prompt[:, ::-1].argmax(axis=1), 0)
        cached = np.minimum(first_masked, last)
    else:
        cached = np.full(len(unique), prefix.length if prefix is not None else 0)
    laid = _Rows(scorer, prefix, model_input.target_ids, ids=ids, keep=torch.from_numpy(unique),
                 baseline_id=int(request.baseline_id), remove=bool(request.remove), cached=cached)
    return laid, inverse.reshape(-1)


def _embedding_rows(scorer: TargetScorer, model_input: ModelInput, request: EmbeddingRows) -> _Rows:
    """An embedding request after its prefix (the tokens before the first attributable one, cached)."""
    positions = torch.from_numpy(np.flatnonzero(model_input.attributable))
    embeds = request.embeds
    if embeds.ndim != 3 or embeds.shape[1] != len(positions):
        raise InvalidInputError(f"embeds must have shape (n, {len(positions)}, H), got {tuple(embeds.shape)}")
    # checkpointed layers recompute their forward in the backward pass, so they must not append to a cache
    cached = int(positions[0]) if scorer.prefix_cache else 0
    checkpointed = request.gradients and scorer.checkpoints(model_input.length - cached, cached, model_input.n_target)
    prefix = None if checkpointed else scorer.prefix(model_input.input_ids, int(positions[0]))
    start = prefix.length if prefix is not None else 0
    return _Rows(scorer, prefix, model_input.target_ids, base=scorer.embed(model_input.input_ids[start:]),
                 positions=(positions - start).to(scorer.device), embeds=embeds, outputs=tuple(request.outputs),
                 checkpoint=checkpointed)


def score_row_requests(
    requests: Sequence[tuple[TargetScorer, ModelInput, MaskedRows]], batch_size: Optional[int] = None
) -> list[np.ndarray]:
    """(n_i, n_target_i) float64 target log-probs per masked request, rows of all requests packed into shared calls.

    Each distinct row of a request is scored once. Rows that share a prefix go through the model together, shortest
    first, ``rows_per_call`` rows per call (``batch_size`` if given); shorter rows are padded on the left, out of
    attention and positions. Each request's scorer counts the calls its rows took part in.
    """
    laid = [_masked_rows(scorer, model_input, request) for scorer, model_input, request in requests]
    answers = _score([rows for rows, _ in laid], batch_size, gradients=False)
    return [log_probs[inverse] for (log_probs, _), (_, inverse) in zip(answers, laid)]


def score_embedding_requests(
    requests: Sequence[tuple[TargetScorer, ModelInput, EmbeddingRows]], batch_size: Optional[int] = None
) -> list[EmbeddingAnswer]:
    """The answers of embedding requests of one or many inputs, rows packed into shared calls as for masked rows:
    one forward pass per call and, where gradients are asked for, one backward pass per output (the forward is
    shared by a row's outputs, e.g. the target tokens of a per-target matrix). The rows of a call are independent,
    so the gradient of the sum of their scalars gives each row exactly its own gradient."""
    laid = [_embedding_rows(scorer, model_input, request) for scorer, model_input, request in requests]
    answers: list[Optional[EmbeddingAnswer]] = [None] * len(requests)
    for wanted in (False, True):
        chosen = [index for index, request in enumerate(requests) if request[2].gradients == wanted]
        for index, (log_probs, gradients) in zip(chosen, _score([laid[i] for i in chosen], batch_size, wanted)):
            answers[index] = EmbeddingAnswer(log_probs, gradients)
    return answers  # type: ignore[return-value]


def _score(requests: Sequence[_Rows], batch_size: Optional[int], gradients: bool
           ) -> list[tuple[np.ndarray, Optional[torch.Tensor]]]:
    """(log-probs, gradients or None) per request, its rows cut into calls by prefix, then width."""
    results = [(np.empty((r.size, int(r.target_ids.shape[-1]))), None) for r in requests]
    grads = [torch.empty((r.size, len(r.outputs), *r.embeds.shape[1:]), dtype=r.base.dtype, device=r.base.device)
             if gradients else None for r in requests]
    entries = [(index, row) for index, rows in enumerate(requests) for row in range(rows.size)]
    for group in _by_prefix_then_width(entries, lambda entry: (id(requests[entry[0]].prefix),
                                                                requests[entry[0]].checkpoint),
                                       lambda entry: requests[entry[0]].width(entry[1])):
        for call in _calls(group, requests, batch_size, gradients):
            log_probs, call_grads = _call([(requests[index], row) for index, row in call], gradients)
            for position, (index, row) in enumerate(call):
                results[index][0][row] = log_probs[position, log_probs.shape[1] - results[index][0].shape[1] :]
                if gradients:
                    grads[index][row] = call_grads[position]
    return [(log_probs, grad) for (log_probs, _), grad in zip(results, grads)]


def _calls(group: list[tuple[int, int]], requests: Sequence[_Rows], batch_size: Optional[int], gradients: bool
           ) -> list[list[tuple[int, int]]]:
    """A width-sorted group of (request, row) entries cut into calls of at most ``rows_per_call`` rows, and (without
    a ``batch_size``) at most the rows whose estimated activation memory fits the scorer's budget."""
    calls: list[list[tuple[int, int]]] = [[]]
    n_target = 0  # the current call's longest target
    budget = None if batch_size is not None or not group else memory_budget(requests[group[0][0]].scorer.model,
                                                                            requests[group[0][0]].scorer.max_memory)
    over: Optional[CallEstimate] = None  # the widest row over budget, if any: warned about once
    for entry in group:
        rows = requests[entry[0]]
        tail = int(rows.target_ids.shape[-1])
        # the entry is the call's widest so far: the group is sorted
        limit = rows_per_call(rows.width(entry[1]), max(n_target, tail), rows.scorer.vocab_size, gradients=gradients,
                              batch_size=batch_size, cpu=rows.scorer.device.type == "cpu")
        estimate = None if budget is None else _estimate(rows, entry[1], max(n_target, tail), gradients)
        if estimate is not None:
            fit = budget // estimate.bytes_per_row
            over = estimate if fit < 1 else over
            limit = min(limit, max(1, fit))
        if calls[-1] and len(calls[-1]) >= limit:
            calls.append([])
            n_target = 0
        calls[-1].append(entry)
        n_target = max(n_target, tail)
    if over is not None:
        rows_within_budget(over, budget)  # one MemoryBudgetWarning (checkpoint=False or already checkpointed)
    return calls


def _estimate(rows: _Rows, row: int, n_target: int, gradients: bool) -> Optional[CallEstimate]:
    """The activation memory of a call per row like ``row`` (``memory.py``), None for a model whose config gives
    no sizes (then only the token and logits budgets apply)."""
    try:
        return call_estimate(rows.scorer.model, length=rows.width(row), prefix=rows.cached_length(row),
                             n_target=n_target, grad=gradients, checkpoint=gradients and rows.checkpoint)
    except InvalidInputError:
        return None


def _by_prefix_then_width(
    entries: Iterable[T], key: Callable[[T], Hashable], width: Callable[[T], int]
) -> list[list[T]]:
    """``entries`` grouped by ``key`` (the id of the prefix object they continue and whether their gradient calls
    are checkpointed: rows of one call share both), each group ordered by width (stable), so that consecutive
    entries cut into calls need little padding."""
    groups: dict[Hashable, list[T]] = {}
    for entry in entries:
        groups.setdefault(key(entry), []).append(entry)
    return [sorted(group, key=width) for group in groups.values()]


def _call(rows: Sequence[tuple[_Rows, int]], gradients: bool) -> tuple[np.ndarray, Optional[list[torch.Tensor]]]:
    """One model call over ``rows`` (one prefix): right-aligned (rows, max n_target) float64 log-probs, and with
    ``gradients`` each row's (outputs, A, H) gradients of its own scalars. Runs outside ``torch.inference_mode`` (a caller's
    inference mode would forbid the gradient) and with gradients enabled only where asked for."""
    with torch.inference_mode(False):
        groups = _gapless_groups(rows)
        if groups is None:
            return _call_model(rows, gradients)
        n_target = max(int(laid.target_ids.shape[-1]) for laid, _ in rows)
        log_probs = np.zeros((len(rows), n_target))
        grads: list[Optional[torch.Tensor]] = [None] * len(rows)
        for members in groups:
            values, group_grads = _call_model([rows[index] for index in members], gradients, compact=True)
            for position, index in enumerate(members):
                log_probs[index, n_target - values.shape[1] :] = values[position]
                if group_grads is not None:
                    grads[index] = group_grads[position]
        return log_probs, grads if gradients else None  # type: ignore[return-value]


def sliding_window(model: Any) -> Optional[int]:
    """The attention window of a model with sliding-window layers (Gemma 2/3, Mistral, ...), else None."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    return window if getattr(config, "use_sliding_window", True) else None


def _gapless_groups(rows: Sequence[tuple[_Rows, int]]) -> Optional[list[list[int]]]:
    """Rows of a call in groups that need no gap, or None where gaps are harmless.

    A call pads shorter rows, and rows whose tokens were removed or that read less of the prefix cache, with slots
    out of attention; positions skip them, but a sliding-window layer measures distance in slots, so once a row may
    span more than its window those gaps change its scores. Then rows go in groups of the same cached length and
    the same number of attended tokens, each run compacted (``_call_model(compact=True)``): no slot is skipped.
    """
    window = sliding_window(rows[0][0].scorer.model)
    if window is None or max(laid.cached_length(row) + laid.width(row) for laid, row in rows) <= window:
        return None
    groups: dict[tuple[int, int], list[int]] = {}
    for index, (laid, row) in enumerate(rows):
        own = laid.cached_length(row)
        attended = int(laid.keep[row, own:].sum()) if laid.ids is not None and laid.remove else laid.width(row)
        groups.setdefault((own, attended), []).append(index)
    return list(groups.values())


def _call_model(rows: Sequence[tuple[_Rows, int]], gradients: bool, compact: bool = False
                ) -> tuple[np.ndarray, Optional[list[torch.Tensor]]]:
    """See ``_call``. ``compact``: the rows share their cached length and attended count (``_gapless_groups``), and
    the leading slots no row attends (removed tokens) are left out of the call."""
    first = rows[0][0]
    scorer = first.scorer
    cached = [laid.cached_length(row) for laid, row in rows]
    lengths = [laid.width(row) for laid, row in rows]
    width, n_target, size = max(lengths), max(int(laid.target_ids.shape[-1]) for laid, _ in rows), len(rows)
    prefix = _cropped(first.prefix, max(cached))  # each row attends to its own first cached[i] slots of it
    reach = prefix.length if prefix is not None else 0
    attention = torch.zeros((size, reach + width), dtype=torch.long)
    targets = torch.zeros((size, n_target), dtype=first.target_ids.dtype)
    ids = torch.zeros((size, width), dtype=torch.long)  # padding id: never attended
    for position, ((laid, row), own, length) in enumerate(zip(rows, cached, lengths)):
        attended = None
        if laid.ids is not None:
            ids[position, width - length :], attended = laid.token_row(row)
        attention[position, :own] = 1
        attention[position, reach + width - length :] = 1 if attended is None else attended
        targets[position, n_target - int(laid.target_ids.shape[-1]) :] = laid.target_ids
    if compact and first.ids is not None:
        unused = int((attention[:, reach:].amax(dim=0) == 0).long().cumprod(0).sum())  # leading slots no row attends
        ids, attention, width = ids[:, unused:], torch.cat([attention[:, :reach], attention[:, reach + unused :]], 1), \
            width - unused
    mask = attention if bool((attention == 0).any()) else None
    started = time.perf_counter()
    if first.ids is not None:
        with torch.no_grad():
            log_probs = scorer.target_log_probs(targets, input_ids=ids, attention_mask=mask, prefix=prefix,
                                                count=False)
        grads = None
    else:
        log_probs, grads = _embedding_call(rows, targets, mask, width, gradients)
    _account(rows, width, gradients, time.perf_counter() - started)
    return log_probs.detach().double().cpu().numpy(), grads


def _cropped(prefix: Optional[Prefix], length: int) -> Optional[Prefix]:
    """The first ``length`` tokens of ``prefix`` (a copy of its cache, cut), ``prefix`` itself when that is all of
    it, None for none."""
    if prefix is None or length == 0:
        return None
    if length == prefix.length:
        return prefix
    cache = copy.deepcopy(prefix.cache)
    cache.crop(length - prefix.length)  # a negative count drops that many tokens from the end (all transformers)
    return Prefix(length, cache, private=True)


def _embedding_call(rows: Sequence[tuple[_Rows, int]], targets: torch.Tensor, mask: Optional[torch.Tensor],
                    width: int, gradients: bool) -> tuple[torch.Tensor, Optional[list[torch.Tensor]]]:
    """The forward (and backward) pass of a call of embedding rows, written into their inputs' full sequences."""
    first = rows[0][0]
    embeds = torch.zeros((len(rows), width, first.base.shape[-1]), dtype=first.base.dtype, device=first.base.device)
    for position, (laid, row) in enumerate(rows):
        offset = width - laid.width(row)
        embeds[position, offset:] = laid.base
        embeds[position, offset + laid.positions] = laid.embeds[row].to(embeds.device, embeds.dtype)
    checkpointed = checkpointed_layers(first.scorer.model) if gradients and first.checkpoint \
        else contextlib.nullcontext()
    with torch.set_grad_enabled(gradients), checkpointed:
        embeds.requires_grad_(gradients)
        log_probs = first.scorer.target_log_probs(targets, inputs_embeds=embeds, attention_mask=mask,
                                                  prefix=first.prefix, count=False)
        if not gradients:
            return log_probs, None
        n_target = log_probs.shape[-1]
        n_outputs = max(len(laid.outputs) for laid, _ in rows)
        per_output = []
        for index in range(n_outputs):  # one backward per output through the shared forward
            scalars = []
            for position, (laid, _) in enumerate(rows):
                if index < len(laid.outputs):
                    own = log_probs[position, n_target - int(laid.target_ids.shape[-1]) :]
                    output = laid.outputs[index]
                    scalars.append(laid.scorer.reduce(own) if output == EXPLAINED_SCORE else own[output])
            (grads,) = torch.autograd.grad(torch.stack(scalars).sum(), embeds, retain_graph=index < n_outputs - 1)
            per_output.append(grads.detach())
    grads = torch.stack(per_output, dim=1)  # (rows, outputs, width, H)
    return log_probs, [grads[position, : len(laid.outputs), width - laid.width(row) + laid.positions]
                       for position, (laid, row) in enumerate(rows)]


def _account(rows: Sequence[tuple[_Rows, int]], width: int, gradients: bool, seconds: float) -> None:
    """Every scorer with rows in a call counts the call once, its rows' tokens, and its share of the call's time."""
    owners = {id(laid.scorer): laid.scorer for laid, _ in rows}
    for key, owner in owners.items():
        own_rows = sum(1 for laid, _ in rows if id(laid.scorer) == key)
        owner.count.forward_passes += 1
        owner.count.backward_passes += max(len(laid.outputs) for laid, _ in rows if id(laid.scorer) == key) \
            if gradients else 0
        owner.count.tokens_processed += width * own_rows
        owner.count.seconds += seconds * own_rows / len(rows)


def answer_requests(requests: Sequence[tuple[TargetScorer, ModelInput, Request]],
                    batch_size: Optional[int] = None) -> list[Any]:
    """The answer to every request (masked rows: log-probs; embedding rows: an ``EmbeddingAnswer``), in order, the
    rows of all masked requests packed together and those of all embedding requests together."""
    answers: list[Any] = [None] * len(requests)
    for kind, score in ((MaskedRows, score_row_requests), (EmbeddingRows, score_embedding_requests)):
        chosen = [index for index, (_, _, request) in enumerate(requests) if isinstance(request, kind)]
        if chosen:
            for index, answer in zip(chosen, score([requests[i] for i in chosen], batch_size)):
                answers[index] = answer
    if any(answer is None for answer in answers):
        unknown = next(type(r).__name__ for (_, _, r), a in zip(requests, answers) if a is None)
        raise InvalidInputError(f"a method asked for {unknown}; requests are MaskedRows or EmbeddingRows")
    return answers
