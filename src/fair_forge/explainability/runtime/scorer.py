"""TargetScorer: teacher-forced log p(target_t | prefix), the one way the library calls the model.

A scorer owns one input's calls: it computes the target log-probs of a batch of token ids or embeddings (only the
positions that predict target tokens, ``logits_to_keep``), reduces them to the explained score (``scores.py``),
caches the key/value prefix every row shares, and counts the passes, tokens and seconds its rows cost. Methods do
not call it directly: they plan requests (``requests.py``) that the packer (``packer.py``) answers for many inputs
at once; ``score_token_masks`` answers one request at once, for backends that call the model themselves.
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Any, Iterator, Optional

import numpy as np
import torch

from ..errors import InvalidInputError, UnsupportedModelError
from ..text.prompt import ModelInput
from .architectures import cache_argument, keeps_logits, output_layer
from .memory import call_estimate, check_max_memory, checkpoint_threshold
from .answers import answer_requests
from .requests import EvaluationCount, MaskedRows, Prefix
from .scores import ScoreKind, get_score

@contextlib.contextmanager
def contiguous_head_input(model: Any) -> Iterator[None]:
    """Hand the output layer a contiguous input while the model runs.

    With ``logits_to_keep`` the model slices the last positions of every row before its output layer; for more
    than one row that slice is strided, and torch runs a strided 3-d input through a vocab-sized linear layer as a
    batched matmul over a broadcast weight: 5.6x slower than on a contiguous copy (forward + backward, SmolLM2's
    576 x 49152 head, 10 rows, 1 thread), about a third of an integrated-gradients call. Same values either way.
    """
    head = output_layer(model)
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda module, args: tuple(
        a.contiguous() if isinstance(a, torch.Tensor) else a for a in args))
    try:
        yield
    finally:
        handle.remove()


class TargetScorer:
    """Scores the target of a ``ModelInput`` under masked ids or perturbed embeddings, and counts what it cost.

    ``score`` is the explained quantity: the sum of target-token log-probs (default), their mean, or the
    probability of the whole target (exp of the sum). With ``prefix_cache`` (default), the tokens before the first
    one a call varies (system prompt, chat header) go through the model once and their key/value cache is reused
    by every row; models whose forward returns no cache are scored without it. ``prefixes`` shares those caches
    between scorers (the items of one batch). ``batch_size`` caps the rows per model call (None: budgets).
    ``max_memory`` is the activation-memory budget of a call in bytes (None: a fraction of the free memory, see
    ``memory.memory_budget``); ``checkpoint`` runs gradient calls with checkpointed layers (``memory.py``), which
    keep a fraction of the memory for one more forward per call, and without the prefix cache.

    With ``contrast`` (a contrastive score's name, ``scores.py``) the scorer explains why its input's target rather
    than its contrast target: the log-probs it is handed hold the target's ``n_target`` columns followed by the
    contrast's ``contrast_length``, and ``reduce`` combines the two sums (``score`` is then not used). With
    ``target_span=(a, b)`` the score is that of target tokens a..b-1 only (the others stay as context).
    """

    def __init__(
        self, model: Any, *, score: ScoreKind = "sum", batch_size: Optional[int] = None, prefix_cache: bool = True,
        prefixes: Optional[dict[tuple[int, ...], Optional[Prefix]]] = None, max_memory: Optional[int] = None,
        checkpoint: Optional[bool] = None, contrast: Optional[str] = None, contrast_length: int = 0,
        target_span: Optional[tuple[int, int]] = None,
    ) -> None:
        self.score_function = get_score(score)  # a typed error for an unknown score
        self.contrast_function = get_score(contrast, contrastive=True) if contrast is not None else None
        if self.contrast_function is not None and (isinstance(contrast_length, bool) or contrast_length < 1):
            raise InvalidInputError(f"a contrast needs its target's length (>= 1), got {contrast_length!r}")
        self.contrast_length = int(contrast_length) if self.contrast_function is not None else 0
        self.target_span = target_span  # explain only these target tokens' log-probs (a claim of the answer)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise InvalidInputError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        self.model = model
        self.score = self.score_function.name
        self.batch_size = batch_size
        self.count = EvaluationCount()
        parameter = next(model.parameters(), None)
        if parameter is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no parameters: it is not a language model")
        self.device, self.dtype = parameter.device, parameter.dtype
        # log-probs, input embeddings and gradients: float32, or the model's dtype where it is wider (float64), so
        # that a float64 model is scored in float64 throughout
        self.score_dtype = torch.promote_types(self.dtype, torch.float32)
        self._keeps_logits = keeps_logits(model)
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
        (``memory.call_estimate``) over ``memory.checkpoint_threshold`` (``max_memory``, or the default call
        budget, on the CPU at most 1 GiB) and checkpointing would keep less: instead of a ``MemoryBudgetWarning`` and
        a call over budget. Once on, it stays on for this
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
        threshold = checkpoint_threshold(self.model, self.max_memory)
        lighter = call_estimate(self.model, length=length, prefix=prefix, n_target=n_target, checkpoint=True)
        if estimate.bytes_per_row <= threshold or lighter.bytes_per_row >= estimate.bytes_per_row:
            return False  # within budget, or a model too shallow for checkpointing to keep less
        self.checkpoint_reason = (
            f"automatic: one row of {length} tokens after a {prefix}-token prefix needs about "
            f"{estimate.bytes_per_row / 2**30:.2f} GiB for a backward pass, over {threshold / 2**30:.2f} GiB "
            "(max_memory, or by default the call budget and on the CPU at most memory.CPU_CHECKPOINT_BYTES)")
        return True

    @property
    def vocab_size(self) -> int:
        """Rows of the output layer (the logits' last dimension), from the config or the output embeddings."""
        value = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if isinstance(value, int) and value > 0:
            return value
        weight = getattr(output_layer(self.model), "weight", None)
        return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else 1

    @property
    def explained(self) -> str:
        """The name of the score this scorer explains: its contrast's, else its score's."""
        return (self.contrast_function or self.score_function).name

    def reduce(self, log_probs: torch.Tensor) -> torch.Tensor:
        """(..., n_target [+ contrast_length]) target log-probs -> (...) explained score: the registered ``score``
        function, or the contrast's ``combine`` of the target's and the contrast's summed log-probs."""
        if self.contrast_function is None:
            spanned = log_probs if self.target_span is None else log_probs[..., slice(*self.target_span)]
            return self.score_function(spanned)
        split = log_probs.shape[-1] - self.contrast_length
        return self.contrast_function(log_probs[..., :split].sum(-1), log_probs[..., split:].sum(-1))

    def per_token(self, log_probs: torch.Tensor) -> torch.Tensor:
        """(..., n_target [+ contrast_length]) log-probs -> the (..., n_target) per-target-token quantities a
        ``per_target`` matrix attributes: the log-probs, or with a contrast of the same length the contrast's
        ``combine`` token by token (a typed error for lengths that differ)."""
        if self.contrast_function is None:
            return log_probs
        split = log_probs.shape[-1] - self.contrast_length
        if split != self.contrast_length:
            raise InvalidInputError(
                f"per_target with a contrast needs a target and a contrast of as many tokens (aligned token by "
                f"token); they have {split} and {self.contrast_length}: use per_target=False")
        return self.contrast_function(log_probs[..., :split], log_probs[..., split:])

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
        """Input embeddings of ``input_ids`` (no gradient), on the model's device, in float32."""
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
        alternative_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(B, n_target) float32 log p(target_t | prefix) for a batch whose sequences end with ``target_ids``.

        Give ``input_ids`` (B, L) or ``inputs_embeds`` (B, L, H); gradients flow through ``inputs_embeds``.
        ``target_ids`` is (n_target,) for every row or (B, n_target) per row. With a ``prefix``, the batch holds only
        the tokens after it. With an ``attention_mask`` (B, [prefix +] L) (0 for padding or removed tokens),
        position ids count only attended tokens. ``count=False`` leaves the counting to the caller. With
        ``alternative_ids`` (B,), one more column: each row's log-prob of that token where its last target token is
        predicted (a one-token contrast of a one-token target costs no extra call).
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
        normaliser = logits.logsumexp(-1)
        log_probs = logits.gather(-1, targets).squeeze(-1) - normaliser
        if alternative_ids is None:
            return log_probs
        last = logits[:, -1].gather(-1, alternative_ids.to(self.device).reshape(size, 1)).squeeze(-1) - normaliser[:, -1]
        return torch.cat([log_probs, last[:, None]], dim=-1)

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
        or (n, n_target [+ n_contrast]) target log-probs with ``per_target=True``.
        """
        baseline = model_input.baseline_token_id if baseline_id is None else int(baseline_id)
        request = MaskedRows(np.asarray(keep, dtype=bool), baseline, remove)
        (log_probs,) = answer_requests([(self, model_input, request)], batch_size or self.batch_size)
        return log_probs if per_target else self.reduce(torch.from_numpy(log_probs)).numpy()
