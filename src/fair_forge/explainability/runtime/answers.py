"""Requests into packed rows and back: what a method asks for, as the packer's row requests, and their answers.

Most requests are one set of rows. Two are more: ``TextRows`` is one unmasked row of each of its inputs, and an input
with a contrast target longer than one token is two inputs, the prompt followed by the target and followed by the
contrast (a one-token contrast of a one-token target is read from the target's own logits, ``packer.alternative_of``).
Every row of every request of a round goes to the packer at once (``packer.score_row_requests`` and
``score_embedding_requests``), and each request's answer is put back together from its parts: the target's columns
then the contrast's, and for gradients the contrastive score's chain rule over its two sides.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..errors import InvalidInputError
from ..text.prompt import ModelInput
from .packer import alternative_of, score_embedding_requests, score_row_requests
from .requests import (EXPLAINED_SCORE, LOG_PROB_SUM, ByScorer, EmbeddingAnswer, EmbeddingRows, MaskedRows, Request,
                       RowScorer, TextRows)

Part = tuple[RowScorer, ModelInput, Any]  # a request the packer answers: MaskedRows or EmbeddingRows
Assemble = Callable[[list[Any]], Any]  # the parts' answers -> the request's answer


def answer_requests(requests: Sequence[tuple[RowScorer, ModelInput, Request]],
                    batch_size: Optional[int] = None) -> list[Any]:
    """The answer to every request, in order: masked and text rows (n, n_target [+ n_contrast]) log-probs, embedding
    rows an ``EmbeddingAnswer``. The rows of all masked parts are packed together, those of all embedding parts
    together."""
    parts: list[Part] = []
    assembled = [_split(scorer, model_input, request, parts) for scorer, model_input, request in requests]
    answers: list[Any] = [None] * len(parts)
    for kind, score in ((MaskedRows, score_row_requests), (EmbeddingRows, score_embedding_requests)):
        chosen = [index for index, part in enumerate(parts) if isinstance(part[2], kind)]
        if chosen:
            for index, answer in zip(chosen, score([parts[i] for i in chosen], batch_size)):
                answers[index] = answer
    return [assemble(answers) for assemble in assembled]


def _split(scorer: RowScorer, model_input: ModelInput, request: Any, parts: list[Part]) -> Assemble:
    """Append the parts of ``request`` to ``parts``; return how to assemble its answer from theirs."""
    if isinstance(request, ByScorer):
        return _split(request.scorer, model_input, request.request, parts)
    if isinstance(request, TextRows):
        pieces = [_split(scorer, each, MaskedRows(np.ones((1, each.length), dtype=bool), each.baseline_token_id),
                         parts) for each in request.inputs]
        if not pieces:
            raise InvalidInputError("TextRows needs at least one input")
        return lambda answers: np.concatenate([piece(answers) for piece in pieces])
    if not isinstance(request, (MaskedRows, EmbeddingRows)):
        raise InvalidInputError(f"a method asked for {type(request).__name__}; requests are MaskedRows, "
                                "EmbeddingRows, TextRows or ByScorer")
    first = len(parts)
    if model_input.contrast is None or alternative_of(model_input) is not None:
        parts.append((scorer, model_input, request))
        return lambda answers: answers[first]
    contrast = contrast_side(model_input)
    if isinstance(request, MaskedRows):
        keep = np.asarray(request.keep, dtype=bool)
        kept_prompt = keep[:, : model_input.target_start] if keep.ndim == 2 else keep
        ones = np.ones((len(kept_prompt), contrast.n_target), dtype=bool)
        parts += [(scorer, model_input, request),
                  (scorer, contrast, MaskedRows(np.concatenate([kept_prompt, ones], axis=1), request.baseline_id,
                                                request.remove))]
        return lambda answers: np.concatenate([answers[first], answers[first + 1]], axis=1)
    outputs = tuple(LOG_PROB_SUM if output == EXPLAINED_SCORE else output for output in request.outputs)
    side = dataclasses.replace(request, outputs=outputs)
    parts += [(scorer, model_input, side), (scorer, contrast, side)]
    return lambda answers: _combined(scorer, request.outputs, answers[first], answers[first + 1])


def contrast_side(model_input: ModelInput) -> ModelInput:
    """The contrast's input (prompt + contrast target) with the target's attributable tokens, so that masks and
    embeddings of the prompt mean the same on both sides."""
    contrast = model_input.contrast
    attributable = np.concatenate([model_input.attributable[: model_input.target_start],
                                   np.zeros(contrast.n_target, dtype=bool)])
    return dataclasses.replace(contrast, attributable=attributable)


def _combined(scorer: RowScorer, outputs: tuple[int, ...], target: EmbeddingAnswer,
              contrast: EmbeddingAnswer) -> EmbeddingAnswer:
    """One answer from the two sides of a contrastive embedding request: log-probs side by side, and each output's
    gradient by the chain rule, d combine(a, b) = combine_a da + combine_b db, a and b the sides' summed log-probs
    (the explained score) or their log-probs of one target token (a per-target row)."""
    log_probs = np.concatenate([target.log_probs, contrast.log_probs], axis=1)
    if target.gradients is None:
        return EmbeddingAnswer(log_probs, None)
    if any(output >= 0 for output in outputs) and target.log_probs.shape[1] != contrast.log_probs.shape[1]:
        raise InvalidInputError("per-target rows of a contrast need a target and a contrast of as many tokens")
    grads = torch.empty_like(target.gradients)
    for index, output in enumerate(outputs):
        if output == EXPLAINED_SCORE:
            a, b = target.log_probs.sum(1), contrast.log_probs.sum(1)
        else:
            a, b = target.log_probs[:, output], contrast.log_probs[:, output]
        da, db = _partials(scorer.contrast_function, a, b)
        shape = (-1,) + (1,) * (target.gradients.dim() - 2)
        grads[:, index] = (da.view(shape).to(grads) * target.gradients[:, index]
                           + db.view(shape).to(grads) * contrast.gradients[:, index])
    return EmbeddingAnswer(log_probs, grads)


def _partials(combine: Any, a: np.ndarray, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """d combine / da and d combine / db at each row's (a, b), by autograd in float64."""
    left = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    right = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    return torch.autograd.grad(combine(left, right).sum(), (left, right))
