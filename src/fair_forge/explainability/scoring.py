"""TargetScorer: teacher-forced log p(target_t | prefix) for batches of inputs, the one way methods call the model.

Batching, dtype handling and the counting of model evaluations live here so every method gets them for free.
``score_row_requests`` and ``score_embedding_requests`` pack rows of one or several inputs into shared model calls
(``packing.py`` uses them to run the items of ``explain_batch`` together).
Only the logits of the positions that predict target tokens are computed (``logits_to_keep``) and they never leave
the model's device: the target log-probs are gathered there and only (batch, n_target) floats come back.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Sequence, TypeVar

import numpy as np
import torch

from .errors import InvalidInputError, ProbabilityUnderflowWarning, UnsupportedModelError
from .prompt import ModelInput

ScoreKind = Literal["sum", "mean", "prob"]
T = TypeVar("T")
SCORE_KINDS: tuple[str, ...] = ("sum", "mean", "prob")
# batch_size=None: masked rows per model call fill MASKED_TOKENS_PER_CALL tokens (after the cached prefix) and at most
# LOGITS_PER_CALL float32 logits (rows x (n_target + 1) x vocab, 128 MB), whichever allows fewer rows. On 2 CPU threads
# 64 rows of 20 tokens ran LIME 1.29x faster than 16 rows, and 128 rows no faster than 64 (SmolLM2, demo input).
MASKED_TOKENS_PER_CALL = 1024
LOGITS_PER_CALL = 2**25


@dataclass
class EvaluationCount:
    """Model evaluations made so far: forward and backward passes and the tokens they processed."""

    forward_passes: int = 0
    backward_passes: int = 0
    tokens_processed: int = 0


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
    """The model's key/value cache for the first ``length`` tokens, shared by every row of every batch."""

    length: int
    cache: Any


class TargetScorer:
    """Scores the target of a ``ModelInput`` under masked ids or perturbed embeddings, in batches.

    ``score`` is the explained quantity: the sum of target-token log-probs (default), their mean, or the
    probability of the whole target (exp of the sum). With ``prefix_cache`` (default), the tokens before the first
    one a batch varies (system prompt, chat header) go through the model once and their key/value cache is reused
    by every row; models whose forward returns no cache are scored without it.
    """

    def __init__(
        self, model: Any, *, score: ScoreKind = "sum", batch_size: Optional[int] = None, prefix_cache: bool = True
    ) -> None:
        if score not in SCORE_KINDS:
            raise InvalidInputError(f"score must be one of {SCORE_KINDS}, got {score!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise InvalidInputError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        self.model = model
        self.score = score
        self.batch_size = batch_size
        self.count = EvaluationCount()
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.prefix_cache = prefix_cache
        self._prefixes: dict[tuple[int, ...], Optional[Prefix]] = {}

    @property
    def vocab_size(self) -> int:
        """Rows of the output layer (the logits' last dimension), from the config or the output embeddings."""
        value = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if isinstance(value, int) and value > 0:
            return value
        weight = getattr(_output_layer(self.model), "weight", None)
        return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else 1

    # ---- the explained quantity -------------------------------------------------------------------------------

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
        """Input embeddings of ``input_ids`` (no gradient), on the model's device."""
        with torch.no_grad():
            return self.embedding_layer()(input_ids.to(self.device))

    def prefix(self, input_ids: torch.Tensor, length: int) -> Optional[Prefix]:
        """The cached first ``length`` tokens of ``input_ids`` (computed once per scorer), or None without caching."""
        if not self.prefix_cache or length < 1:
            return None
        key = tuple(input_ids[:length].tolist())
        if key not in self._prefixes:
            kwargs = {"logits_to_keep": 1} if self._keeps_logits else {}  # the prefix's logits are never used
            with torch.no_grad():
                output = self.model(input_ids=input_ids[:length].unsqueeze(0).to(self.device), use_cache=True, **kwargs)
            self.count.forward_passes += 1
            self.count.tokens_processed += length
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
        """(B, n_target) float32 log p(target_t | prefix) for a batch whose sequences end with ``target_ids``.

        Give ``input_ids`` (B, L) or ``inputs_embeds`` (B, L, H); gradients flow through ``inputs_embeds``.
        ``target_ids`` is (n_target,) for every row or (B, n_target) per row. With a ``prefix``, the batch holds only
        the tokens after it. With an ``attention_mask`` (B, [prefix +] L) (0 for padding or removed tokens),
        position ids count only attended tokens. ``count=False`` leaves the counting to the caller.
        """
        return self._forward(target_ids, input_ids=input_ids, inputs_embeds=inputs_embeds,
                             attention_mask=attention_mask, prefix=prefix, count=count)

    def _forward(
        self,
        target_ids: torch.Tensor,
        *,
        input_ids: Optional[torch.Tensor],
        inputs_embeds: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        prefix: Optional[Prefix],
        count: bool,
    ) -> torch.Tensor:
        """The model call behind ``target_log_probs``, made in the calling thread."""
        n_target = int(target_ids.shape[-1])
        batch = input_ids if input_ids is not None else inputs_embeds
        size, length = int(batch.shape[0]), int(batch.shape[1])
        kwargs: dict[str, Any] = {"use_cache": False}
        if prefix is not None:
            cache = copy.deepcopy(prefix.cache)  # the forward appends to it
            cache.batch_repeat_interleave(size)
            kwargs.update(use_cache=True, past_key_values=cache)
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
        logits = logits[:, -(n_target + 1) : -1].float()  # positions that predict the target tokens
        targets = target_ids.to(self.device).reshape(-1, n_target, 1).expand(size, n_target, 1)
        return logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(-1)

    def score_embeddings(self, target_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                         prefix: Optional[Prefix] = None) -> torch.Tensor:
        """(B,) explained score of rows of input embeddings (after ``prefix``), differentiable w.r.t. them."""
        return self.reduce(self.target_log_probs(target_ids, inputs_embeds=inputs_embeds, prefix=prefix))

    # ---- masked ids (perturbation methods) --------------------------------------------------------------------

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
        """Score ``model_input`` with the tokens where ``keep`` (n, L) is False masked out.

        Masked tokens are replaced by ``baseline_id`` (default: the input's baseline token), or deleted with
        ``remove=True`` (the kept tokens move right and the freed slots are left out of attention and positions).
        Identical rows are scored once, ``batch_size`` rows per model call (default: the scorer's; None sizes calls by
        ``MASKED_TOKENS_PER_CALL`` and ``LOGITS_PER_CALL``). Returns (n,)
        explained scores, or (n, n_target) target log-probs with ``per_target=True``.
        """
        keep = np.asarray(keep, dtype=bool)
        if keep.ndim != 2 or keep.shape[1] != model_input.length:
            raise InvalidInputError(f"keep must have shape (n, {model_input.length}), got {keep.shape}")
        if not keep[:, model_input.target_start :].all():
            raise InvalidInputError("target tokens cannot be masked")
        unique, inverse = np.unique(keep, axis=0, return_inverse=True)
        ids = model_input.input_ids
        # tokens before the first attributable (and first masked) one are the same in every row of every call:
        # computed once per explanation
        varied = np.flatnonzero(~unique.all(axis=0))
        start = min(np.flatnonzero(model_input.attributable)[:1].tolist() + varied[:1].tolist() + [model_input.target_start])
        prefix = self.prefix(ids, start)
        start = prefix.length if prefix is not None else 0
        mask = torch.from_numpy(unique[:, start:])
        rows = ids[start:].expand(len(unique), -1)
        if remove:  # kept tokens moved right, so the last kept one predicts the first target token
            order = torch.sort(mask.long(), dim=1, stable=True).indices  # removed positions first, order kept
            request = RowRequest(rows.gather(1, order), model_input.target_ids, prefix,
                                 attention=mask.long().gather(1, order))
        else:
            baseline = model_input.baseline_token_id if baseline_id is None else int(baseline_id)
            request = RowRequest(torch.where(mask, rows, torch.full_like(rows, baseline)), model_input.target_ids, prefix)
        log_probs = self.score_rows(request, batch_size or self.batch_size)
        scores = (log_probs if per_target else self.reduce(log_probs)).double().cpu().numpy()
        return scores[inverse.reshape(-1)]

    def score_rows(self, request: RowRequest, batch_size: Optional[int]) -> torch.Tensor:
        """(n, n_target) target log-probs of the request's rows, ``batch_size`` rows per model call (None: sized)."""
        return score_row_requests([(self, request)], batch_size)[0]


@dataclass(frozen=True)
class RowRequest:
    """Rows of one input to score without gradients, every row ending with ``target_ids``.

    ``ids`` (n, l) are the tokens after ``prefix`` (the whole sequence without one); ``attention`` (n, l), if
    given, is 0 for tokens removed from attention.
    """

    ids: torch.Tensor
    target_ids: torch.Tensor
    prefix: Optional[Prefix]
    attention: Optional[torch.Tensor] = None


def score_row_requests(
    requests: Sequence[tuple[TargetScorer, RowRequest]], batch_size: Optional[int]
) -> list[torch.Tensor]:
    """Score every request's rows, packing rows of different requests (inputs) into the same model calls.

    Rows that share a prefix (the same cached object) go through the model together, shortest first, at most
    ``batch_size`` per call (None: as many as ``masked_rows_per_call`` allows for the call's longest row). Rows
    shorter than the longest in their call are padded between the prefix and their own tokens and the padding is
    removed from attention, so every row ends at the last position and its target log-probs are read from the end.
    Each scorer counts the calls its rows took part in. Returns one (n_i, n_target_i) float32 tensor per request,
    in request order.
    """
    results = [torch.empty(len(r.ids), int(r.target_ids.shape[-1])) for _, r in requests]
    vocab_size = requests[0][0].vocab_size if requests else 1
    entries = [(index, row) for index, (_, request) in enumerate(requests) for row in range(len(request.ids))]
    for group in _by_prefix_then_width(entries, lambda entry: requests[entry[0]][1].prefix,
                                       lambda entry: int(requests[entry[0]][1].ids.shape[1])):
        calls: list[list[tuple[int, int]]] = [[]]
        n_target = 0  # the current call's longest target
        for entry in group:
            request = requests[entry[0]][1]
            width, tail = int(request.ids.shape[1]), int(request.target_ids.shape[-1])  # width: the longest (sorted)
            limit = batch_size or masked_rows_per_call(width, max(n_target, tail), vocab_size)
            if calls[-1] and len(calls[-1]) >= limit:
                calls.append([])
                n_target = 0
            calls[-1].append(entry)
            n_target = max(n_target, tail)
        for call in calls:
            with torch.no_grad():
                log_probs = _score_packed([(requests[index], row) for index, row in call])
            for (index, row), values in zip(call, log_probs):
                results[index][row] = values[len(values) - results[index].shape[1] :].cpu()
    return results


def _by_prefix_then_width(
    entries: Iterable[T], prefix: Callable[[T], Optional[Prefix]], width: Callable[[T], int]
) -> list[list[T]]:
    """``entries`` grouped by the prefix object they continue (rows of one call share it), each group ordered by
    width (stable), so that consecutive entries cut into calls need little padding."""
    groups: dict[int, list[T]] = {}
    for entry in entries:
        groups.setdefault(id(prefix(entry)), []).append(entry)
    return [sorted(group, key=width) for group in groups.values()]


def masked_rows_per_call(width: int, n_target: int, vocab_size: int) -> int:
    """Rows of ``width`` tokens per no-grad model call when no batch size is given (see ``MASKED_TOKENS_PER_CALL``)."""
    return max(1, min(MASKED_TOKENS_PER_CALL // max(width, 1), LOGITS_PER_CALL // ((n_target + 1) * vocab_size)))


def _score_packed(rows: Sequence[tuple[tuple[TargetScorer, RowRequest], int]]) -> list[torch.Tensor]:
    """One model call over ``rows`` (all with the same prefix); per row its right-aligned target log-probs."""
    scorer, first = rows[0][0]
    width, attention, targets = _layout(
        [int(request.ids.shape[1]) for (_, request), _ in rows],
        [request.target_ids for (_, request), _ in rows],
        [None if request.attention is None else request.attention[row] for (_, request), row in rows],
        first.prefix,
    )
    ids = torch.zeros((len(rows), width), dtype=first.ids.dtype)  # padding id: never attended
    for position, ((_, request), row) in enumerate(rows):
        ids[position, width - request.ids.shape[1] :] = request.ids[row]
    log_probs = scorer._forward(targets, input_ids=ids, inputs_embeds=None, attention_mask=attention,
                                prefix=first.prefix, count=False)
    _count_call([owner for (owner, _), _ in rows], width)
    return list(log_probs)


def _layout(
    lengths: Sequence[int], row_targets: Sequence[torch.Tensor], row_attention: Sequence[Optional[torch.Tensor]],
    prefix: Optional[Prefix],
) -> tuple[int, Optional[torch.Tensor], torch.Tensor]:
    """Width, attention mask and (rows, max n_target) right-aligned target ids of a packed call.

    Rows are right-aligned; the slots before a shorter row (and its own removed tokens) are out of attention. The
    mask covers the prefix too, and is None when every row fills the width and attends to every token.
    """
    width, n_target, size = max(lengths), max(int(t.shape[-1]) for t in row_targets), len(lengths)
    attention = torch.zeros((size, width), dtype=torch.long)
    targets = torch.zeros((size, n_target), dtype=row_targets[0].dtype)
    padded = False
    for row, (length, target, attended) in enumerate(zip(lengths, row_targets, row_attention)):
        attention[row, width - length :] = 1 if attended is None else attended
        targets[row, n_target - int(target.shape[-1]) :] = target
        padded = padded or length < width or attended is not None
    if not padded:
        return width, None, targets
    if prefix is not None:
        attention = torch.cat([torch.ones((size, prefix.length), dtype=torch.long), attention], dim=1)
    return width, attention, targets


def _count_call(owners: Sequence[TargetScorer], width: int) -> None:
    """Every scorer with rows (``owners``, one per row) in a call of ``width`` counts the call and its rows' tokens."""
    for owner in {id(owner): owner for owner in owners}.values():
        owner.count.forward_passes += 1
        owner.count.tokens_processed += width * sum(1 for other in owners if other is owner)


@dataclass(frozen=True)
class EmbeddingRequest:
    """Rows of input embeddings (n, l, H) after ``prefix``, each ending with ``target_ids``, whose explained score and
    its gradient w.r.t. the embeddings are wanted."""

    embeds: torch.Tensor
    target_ids: torch.Tensor
    prefix: Optional[Prefix]


def score_embedding_requests(
    requests: Sequence[tuple[TargetScorer, EmbeddingRequest]], tokens_per_call: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(scores (n_i,), gradients (n_i, l_i, H)) per request, several requests per forward + backward pass.

    Whole requests sharing a prefix are packed into one call while it holds at most ``tokens_per_call`` tokens
    (a request larger than that runs alone). Rows are padded between the prefix and their own embeddings, the
    padding out of attention and positions; the rows of a call are independent, so the gradient of the sum of
    their scores gives each row exactly its own gradient. Each scorer counts the passes its rows took part in.
    """
    results: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * len(requests)
    for indices in _by_prefix_then_width(range(len(requests)), lambda index: requests[index][1].prefix,
                                         lambda index: int(requests[index][1].embeds.shape[1])):
        calls: list[list[int]] = [[]]
        for index in indices:
            call = calls[-1] + [index]
            rows = sum(int(requests[i][1].embeds.shape[0]) for i in call)
            width = max(int(requests[i][1].embeds.shape[1]) for i in call)
            if calls[-1] and rows * width > tokens_per_call:
                calls.append([index])
            else:
                calls[-1] = call
        for call in calls:
            for index, result in zip(call, _score_embeddings_packed([requests[i] for i in call])):
                results[index] = result
    return results  # type: ignore[return-value]


def _score_embeddings_packed(
    requests: Sequence[tuple[TargetScorer, EmbeddingRequest]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One forward and one backward over the rows of ``requests`` (same prefix)."""
    scorer, first = requests[0]
    owners = [owner for owner, request in requests for _ in range(request.embeds.shape[0])]
    width, attention, targets = _layout(
        [int(request.embeds.shape[1]) for owner, request in requests for _ in range(request.embeds.shape[0])],
        [request.target_ids for owner, request in requests for _ in range(request.embeds.shape[0])],
        [None] * len(owners),
        first.prefix,
    )
    embeds = torch.zeros((len(owners), width, first.embeds.shape[-1]), dtype=torch.float32, device=first.embeds.device)
    spans, start = [], 0
    for owner, request in requests:
        rows, length = int(request.embeds.shape[0]), int(request.embeds.shape[1])
        embeds[start : start + rows, width - length :] = request.embeds
        spans.append((start, rows, length, int(request.target_ids.shape[-1])))
        start += rows
    embeds.requires_grad_(True)
    with torch.enable_grad():
        log_probs = scorer._forward(targets, input_ids=None, inputs_embeds=embeds, attention_mask=attention,
                                    prefix=first.prefix, count=False)
        n_target = log_probs.shape[-1]
        scores = [owner.reduce(log_probs[begin : begin + rows, n_target - tail :])
                  for (owner, _), (begin, rows, _, tail) in zip(requests, spans)]
        (gradients,) = torch.autograd.grad(torch.cat(scores).sum(), embeds)
    _count_call(owners, width)
    return [
        (score.detach(), gradients[begin : begin + rows, width - length :])
        for score, (begin, rows, length, _) in zip(scores, spans)
    ]
