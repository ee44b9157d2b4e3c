"""The packer: the requests of one or many inputs answered in shared, budgeted model calls.

``score_row_requests`` and ``score_embedding_requests`` lay out each request's rows after their prefix cache, group
the rows of all requests by the cache they continue, sort them by width and cut them into calls; ``rows_per_call``
is the one place that decides how many rows a call holds (token, logits and activation-memory budgets). A call pads
shorter rows on the left, out of attention and positions, so every row ends at the last position; only the logits of
the positions that predict target tokens are computed, and only (rows, n_target) floats leave the model's device.
Each request's scorer counts the calls its rows took part in. ``answers.py`` turns requests into the rows packed here.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Optional, Sequence, TypeVar

import numpy as np
import torch

from ..errors import InvalidInputError
from ..text.prompt import ModelInput
from .architectures import sliding_window
from .memory import CallEstimate, call_estimate, checkpointed_layers, memory_budget
from .memory import rows_per_call as rows_within_budget
from .requests import EXPLAINED_SCORE, LOG_PROB_SUM, EmbeddingAnswer, EmbeddingRows, MaskedRows, Prefix, RowScorer

T = TypeVar("T")
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

    scorer: RowScorer
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
    alternative: Optional[int] = None  # a one-token contrast of a one-token target: scored from the same logits
    checkpoint: bool = False  # gradient calls run checkpointed layers (and then have no prefix cache)

    @property
    def answer_width(self) -> int:
        """Columns of a row's answer: its target's log-probs, and its alternative's."""
        return int(self.target_ids.shape[-1]) + (self.alternative is not None)

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


def _masked_rows(scorer: RowScorer, model_input: ModelInput, request: MaskedRows) -> tuple[_Rows, np.ndarray]:
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
                 baseline_id=int(request.baseline_id), remove=bool(request.remove), cached=cached,
                 alternative=alternative_of(model_input))
    return laid, inverse.reshape(-1)


def _embedding_rows(scorer: RowScorer, model_input: ModelInput, request: EmbeddingRows) -> _Rows:
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
                 alternative=alternative_of(model_input), checkpoint=checkpointed)


def alternative_of(model_input: ModelInput) -> Optional[int]:
    """The contrast token of a one-token target with a one-token contrast (scored from the target's own logits),
    else None (a longer contrast is a second input of its own, ``answers.py``)."""
    contrast = model_input.contrast
    if contrast is None or model_input.n_target != 1 or contrast.n_target != 1:
        return None
    return int(contrast.target_ids[0])


def score_row_requests(
    requests: Sequence[tuple[RowScorer, ModelInput, MaskedRows]], batch_size: Optional[int] = None
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
    requests: Sequence[tuple[RowScorer, ModelInput, EmbeddingRows]], batch_size: Optional[int] = None
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
    results = [(np.empty((r.size, r.answer_width)), None) for r in requests]
    grads = [torch.empty((r.size, len(r.outputs), *r.embeds.shape[1:]), dtype=r.base.dtype, device=r.base.device)
             if gradients else None for r in requests]
    entries = [(index, row) for index, rows in enumerate(requests) for row in range(rows.size)]
    for group in _by_prefix_then_width(entries, lambda entry: (id(requests[entry[0]].prefix),
                                                                requests[entry[0]].checkpoint,
                                                                id(requests[entry[0]].scorer.model)),
                                       lambda entry: requests[entry[0]].width(entry[1])):
        for call in _calls(group, requests, batch_size, gradients):
            log_probs, call_grads = _call([(requests[index], row) for index, row in call], gradients)
            for position, (index, row) in enumerate(call):
                results[index][0][row] = log_probs[position]
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
    """``entries`` grouped by ``key`` (the id of the prefix object they continue, whether their gradient calls are
    checkpointed, and the model that runs them: rows of one call share all three; without a cache, rows of two models
    would otherwise meet), each group ordered by width (stable), so that consecutive
    entries cut into calls need little padding."""
    groups: dict[Hashable, list[T]] = {}
    for entry in entries:
        groups.setdefault(key(entry), []).append(entry)
    return [sorted(group, key=width) for group in groups.values()]


def _call(rows: Sequence[tuple[_Rows, int]], gradients: bool
          ) -> tuple[list[np.ndarray], Optional[list[torch.Tensor]]]:
    """One model call over ``rows`` (one prefix): each row's float64 answer (its target's log-probs, and its
    alternative's), and with ``gradients`` each row's (outputs, A, H) gradients of its own scalars. Runs outside
    ``torch.inference_mode`` (a caller's inference mode would forbid the gradient) and with gradients enabled only
    where asked for."""
    with torch.inference_mode(False):
        groups = _gapless_groups(rows)
        if groups is None:
            return _call_model(rows, gradients)
        log_probs: list[Optional[np.ndarray]] = [None] * len(rows)
        grads: list[Optional[torch.Tensor]] = [None] * len(rows)
        for members in groups:
            values, group_grads = _call_model([rows[index] for index in members], gradients, compact=True)
            for position, index in enumerate(members):
                log_probs[index] = values[position]
                if group_grads is not None:
                    grads[index] = group_grads[position]
        return log_probs, grads if gradients else None  # type: ignore[return-value]


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
                ) -> tuple[list[np.ndarray], Optional[list[torch.Tensor]]]:
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
    alternatives = None
    if any(laid.alternative is not None for laid, _ in rows):
        alternatives = torch.tensor([laid.alternative or 0 for laid, _ in rows], dtype=torch.long)
    started = time.perf_counter()
    if first.ids is not None:
        with torch.no_grad():
            log_probs = scorer.target_log_probs(targets, input_ids=ids, attention_mask=mask, prefix=prefix,
                                                count=False, alternative_ids=alternatives)
        grads = None
    else:
        log_probs, grads = _embedding_call(rows, targets, mask, width, gradients, alternatives)
    _account(rows, width, gradients, time.perf_counter() - started)
    values = log_probs.detach().double().cpu().numpy()
    return [_own(values, position, laid, n_target) for position, (laid, _) in enumerate(rows)], grads


def _own(log_probs: Any, position: int, laid: _Rows, n_target: int) -> Any:
    """A row's own answer in a call's log-probs (rows, n_target [+ 1]): its target tokens' columns (right-aligned in
    the first ``n_target``), then its alternative's (the last column) if it has one."""
    own = log_probs[position, n_target - int(laid.target_ids.shape[-1]) : n_target]
    if laid.alternative is None:
        return own
    extra = log_probs[position, -1:]
    return torch.cat([own, extra]) if isinstance(own, torch.Tensor) else np.concatenate([own, extra])


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
                    width: int, gradients: bool, alternatives: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, Optional[list[torch.Tensor]]]:
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
                                                  prefix=first.prefix, count=False, alternative_ids=alternatives)
        if not gradients:
            return log_probs, None
        n_target = int(targets.shape[-1])
        n_outputs = max(len(laid.outputs) for laid, _ in rows)
        per_output = []
        for index in range(n_outputs):  # one backward per output through the shared forward
            scalars = []
            for position, (laid, _) in enumerate(rows):
                if index < len(laid.outputs):
                    scalars.append(_scalar(laid, _own(log_probs, position, laid, n_target), laid.outputs[index]))
            (grads,) = torch.autograd.grad(torch.stack(scalars).sum(), embeds, retain_graph=index < n_outputs - 1)
            per_output.append(grads.detach())
    grads = torch.stack(per_output, dim=1)  # (rows, outputs, width, H)
    return log_probs, [grads[position, : len(laid.outputs), width - laid.width(row) + laid.positions]
                       for position, (laid, row) in enumerate(rows)]


def _scalar(laid: _Rows, own: torch.Tensor, output: int) -> torch.Tensor:
    """The scalar a row differentiates for ``output``: the explained score, the sum of its log-probs, or a target
    token's quantity (its log-prob; with an alternative, the contrast's per-token combination)."""
    if output == EXPLAINED_SCORE:
        return laid.scorer.reduce(own)
    if output == LOG_PROB_SUM:
        return own.sum()
    return (laid.scorer.per_token(own) if laid.alternative is not None else own)[output]


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
