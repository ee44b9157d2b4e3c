"""TargetScorer: teacher-forced log p(target_t | prefix) for batches of inputs, the one way methods call the model.

Batching, dtype handling and the counting of model evaluations live here so every method gets them for free.
Only the logits of the positions that predict target tokens are computed (``logits_to_keep``) and they never leave
the model's device: the target log-probs are gathered there and only (batch, n_target) floats come back.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional

import numpy as np
import torch

from .errors import InvalidInputError, UnsupportedModelError
from .prompt import ModelInput

ScoreKind = Literal["sum", "mean", "prob"]
SCORE_KINDS: tuple[str, ...] = ("sum", "mean", "prob")
DEFAULT_BATCH_SIZE = 16


@dataclass
class EvaluationCount:
    """Model evaluations made so far: forward and backward passes and the tokens they processed."""

    forward_passes: int = 0
    backward_passes: int = 0
    tokens_processed: int = 0


def model_context_length(model: Any) -> Optional[int]:
    """The model's maximum sequence length from its config, if it states one."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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
        self, model: Any, *, score: ScoreKind = "sum", batch_size: int = DEFAULT_BATCH_SIZE, prefix_cache: bool = True
    ) -> None:
        if score not in SCORE_KINDS:
            raise InvalidInputError(f"score must be one of {SCORE_KINDS}, got {score!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = model
        self.score = score
        self.batch_size = batch_size
        self.count = EvaluationCount()
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.prefix_cache = prefix_cache
        self._prefixes: dict[tuple[int, ...], Optional[Prefix]] = {}

    # ---- the explained quantity -------------------------------------------------------------------------------

    def reduce(self, log_probs: torch.Tensor) -> torch.Tensor:
        """(..., n_target) target log-probs -> (...) explained score."""
        if self.score == "sum":
            return log_probs.sum(-1)
        if self.score == "mean":
            return log_probs.mean(-1)
        return log_probs.sum(-1).exp()

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
    ) -> torch.Tensor:
        """(B, n_target) float32 log p(target_t | prefix) for a batch whose sequences end with ``target_ids``.

        Give ``input_ids`` (B, L) or ``inputs_embeds`` (B, L, H); gradients flow through ``inputs_embeds``.
        With a ``prefix``, the batch holds only the tokens after it. With an ``attention_mask`` (B, L) (e.g. left
        padding; not with a prefix), position ids count only attended tokens.
        """
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
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if self._keeps_logits:
            kwargs["logits_to_keep"] = n_target + 1
        try:
            logits = self.model(**kwargs).logits
        except RuntimeError as error:
            if self.dtype == torch.float16 and self.device.type == "cpu":
                raise UnsupportedModelError(
                    "float16 models do not run reliably on the CPU; convert with model.float() or "
                    "model.to(torch.bfloat16), or run on a GPU"
                ) from error
            raise
        self.count.forward_passes += 1
        self.count.tokens_processed += size * length
        logits = logits[:, -(n_target + 1) : -1].float()  # positions that predict the target tokens
        targets = target_ids.to(self.device).reshape(1, n_target, 1).expand(size, n_target, 1)
        return logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(-1)

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
        ``remove=True`` (rows left-padded and attention-masked, positions counted over the kept tokens only).
        Identical rows are scored once, ``batch_size`` rows per model call (default: the scorer's). Returns (n,)
        explained scores, or (n, n_target) target log-probs with ``per_target=True``.
        """
        keep = np.asarray(keep, dtype=bool)
        if keep.ndim != 2 or keep.shape[1] != model_input.length:
            raise InvalidInputError(f"keep must have shape (n, {model_input.length}), got {keep.shape}")
        if not keep[:, model_input.target_start :].all():
            raise InvalidInputError("target tokens cannot be masked")
        unique, inverse = np.unique(keep, axis=0, return_inverse=True)
        baseline = model_input.baseline_token_id if baseline_id is None else int(baseline_id)
        ids = model_input.input_ids
        # tokens before the first attributable (and first masked) one are the same in every row of every call:
        # computed once per explanation (not with left padding, which shifts them)
        varied = np.flatnonzero(~unique.all(axis=0))
        start = min(np.flatnonzero(model_input.attributable)[:1].tolist() + varied[:1].tolist() + [model_input.target_start])
        prefix = None if remove else self.prefix(ids, start)
        start = prefix.length if prefix is not None else 0
        chunks = []
        with torch.no_grad():
            for rows in self._chunks(unique, batch_size or self.batch_size):
                mask = torch.from_numpy(rows)
                if remove:
                    batch_ids, attention = _delete_and_left_pad(ids, mask, baseline)
                    log_probs = self.target_log_probs(model_input.target_ids, input_ids=batch_ids, attention_mask=attention)
                else:
                    batch_ids = torch.where(mask, ids, torch.full_like(ids, baseline))[:, start:]
                    log_probs = self.target_log_probs(model_input.target_ids, input_ids=batch_ids, prefix=prefix)
                chunks.append(log_probs if per_target else self.reduce(log_probs))
        scores = torch.cat(chunks).double().cpu().numpy()
        return scores[inverse.reshape(-1)]

    @staticmethod
    def _chunks(rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(rows), size):
            yield rows[start : start + size]


def _delete_and_left_pad(ids: torch.Tensor, keep: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``keep`` applied to ``ids`` as a deletion, left-padded so every row ends with the target."""
    lengths = keep.sum(-1)
    width = int(lengths.max())
    batch = torch.full((keep.shape[0], width), pad_id, dtype=ids.dtype)
    attention = torch.zeros((keep.shape[0], width), dtype=torch.long)
    for row, (mask, length) in enumerate(zip(keep, lengths.tolist())):
        batch[row, width - length :] = ids[mask]
        attention[row, width - length :] = 1
    return batch, attention
