"""AT2's head weights (Cohen-Wang et al. 2025, "Learning to Attribute with Attention"): their file, the model they
belong to, and how they are learned.

A source's AT2 score is sum over (layer, head) of w[layer, head] * a[layer, head], a = the attention from the
target's rows to the source's tokens (summed over its tokens, averaged over the rows). ``train_at2`` learns w from
ablations: for each training document, random subsets of its sources (sentences) are removed, the package's scorer
(``TargetScorer.score_token_masks``) gives the explained score of each ablated input, and w is fitted so that the
predicted effect of an ablation, w . sum_s (2 m_s - 1) a_s (+1 for a kept source, -1 for a removed one), correlates
with the actual scores: the paper's objective, the negative Pearson correlation over each document's ablations,
averaged over documents, minimised by Adam (cosine-annealed step, gradient norm clipped at 1) from uniform weights,
then scaled to an L1 norm of 1. The correlation does not change when w is multiplied by a positive number, so that
is the one freedom the objective leaves (and directions no document's attention varies along stay at their start).

The weights are saved (safetensors) with a fingerprint of the model they were trained on (its config, minus what
does not change the computation, and a few weights rounded to bfloat16, so a float32 model and its bfloat16 copy
share it), reused by ``train_at2(..., path=)`` when the model and the training settings are the same, and refused
with a clear error for another model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import InvalidInputError, NoAttributableFeaturesError
from ..runtime.attention import QUERY_ROWS, QueryRows, query_rows, read_attention

FORMAT = "fair_forge.at2/1"
# config entries that name, time-stamp or steer the bookkeeping of a model rather than what it computes
VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash", "architectures",
    "_attn_implementation", "attn_implementation", "_attn_implementation_internal", "_attn_implementation_autoset",
    "output_attentions", "output_hidden_states", "return_dict", "use_cache", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "initializer_range", "quantization_config",
})
WHITENING_FLOOR = 1e-4  # see _whitening: the most a feature direction is stretched is 1 / sqrt(this)
SAMPLED_VALUES = 256  # leading values of the first, middle and last parameter that enter the fingerprint


def model_fingerprint(model: Any) -> str:
    """A short hash of what makes ``model`` the model it is: its config (without ``VOLATILE_CONFIG_KEYS``), every
    parameter's name and shape, and the first values of three of them rounded to bfloat16."""
    config = getattr(model, "config", None)
    described = _stable(config.to_dict()) if hasattr(config, "to_dict") else {"class": type(model).__name__}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
    parameters = list(model.named_parameters())
    for name, parameter in parameters:
        digest.update(f"{name}:{tuple(parameter.shape)};".encode())
    for name, parameter in {0: parameters[0], 1: parameters[len(parameters) // 2], 2: parameters[-1]}.values():
        values = parameter.detach().reshape(-1)[:SAMPLED_VALUES].to(torch.bfloat16).view(torch.int16)
        digest.update(values.cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _stable(item) for key, item in value.items() if key not in VOLATILE_CONFIG_KEYS}
    return value


@dataclass(frozen=True)
class At2Weights:
    """Learned (n_layers, n_heads) head weights, the fingerprint of the model they belong to, the attention rows
    they were learned on, and a summary of their training."""

    head_weights: np.ndarray
    fingerprint: str
    model_type: str = ""
    rows: QueryRows = "predicting"
    info: dict[str, Any] = field(default_factory=dict)
    path: Optional[str] = None  # the file they were loaded from or saved to

    def __post_init__(self) -> None:
        weights = np.asarray(self.head_weights, dtype=np.float32)
        if weights.ndim != 2 or not np.isfinite(weights).all():
            raise InvalidInputError(f"AT2 head weights must be a finite (n_layers, n_heads) array, got {weights.shape}")
        if self.rows not in QUERY_ROWS:
            raise InvalidInputError(f"AT2 weights' rows must be one of {QUERY_ROWS}, got {self.rows!r}")
        object.__setattr__(self, "head_weights", weights)

    @classmethod
    def uniform(cls, model: Any, rows: QueryRows = "predicting") -> "At2Weights":
        """Every head weighted alike (1 / heads): AT2 then ranks sources as the ``attention`` method does."""
        from ..runtime.attention import n_attention_layers

        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head"))
        layers = n_attention_layers(model)
        return cls(np.full((layers, heads), 1.0 / (layers * heads)), model_fingerprint(model),
                   str(getattr(config, "model_type", "")), rows, {"trained": False})

    @property
    def digest(self) -> str:
        """A hash of the weights, the model's fingerprint and the rows: what a run's settings record."""
        digest = hashlib.sha256(self.head_weights.tobytes())
        digest.update(f"{self.fingerprint}:{self.rows}".encode())
        return digest.hexdigest()[:32]

    def check(self, model: Any) -> None:
        """A clear error, before any model call, when these weights were learned on another model."""
        found = model_fingerprint(model)
        if found != self.fingerprint:
            origin = f" (from {self.path})" if self.path else ""
            raise InvalidInputError(
                f"these AT2 weights{origin} were trained on another model (a {self.model_type or 'different'} "
                f"model, fingerprint {self.fingerprint}; this one's is {found}); train weights for this model with "
                "train_at2(model, tokenizer, documents, path=...)")

    def save(self, path: Union[str, os.PathLike]) -> "At2Weights":
        """Write the weights and their model's fingerprint to ``path`` (safetensors); returns them with ``path``."""
        from safetensors.numpy import save_file

        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"format": FORMAT, "fingerprint": self.fingerprint, "model_type": self.model_type,
                    "rows": self.rows, "info": json.dumps(self.info, sort_keys=True, default=str)}
        save_file({"head_weights": self.head_weights}, str(target), metadata=metadata)
        return At2Weights(self.head_weights, self.fingerprint, self.model_type, self.rows, dict(self.info), str(target))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "At2Weights":
        """Read weights written by ``save`` (or ``train_at2``); a typed error for a missing or foreign file."""
        from safetensors import safe_open

        source = Path(path)
        if not source.is_file():
            raise InvalidInputError(f"no AT2 weights file at {str(source)!r}; train one with "
                                    "train_at2(model, tokenizer, documents, path=...)")
        try:
            with safe_open(str(source), framework="numpy") as opened:
                metadata = opened.metadata() or {}
                weights = opened.get_tensor("head_weights")
        except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise InvalidInputError(
                f"{str(source)!r} is not an AT2 weights file written by train_at2: {error}") from None
        if metadata.get("format") != FORMAT:
            raise InvalidInputError(f"{str(source)!r} is not an AT2 weights file written by train_at2 "
                                    f"(format {metadata.get('format')!r}, expected {FORMAT!r})")
        return cls(weights, metadata["fingerprint"], metadata.get("model_type", ""), metadata.get("rows", "predicting"),
                   json.loads(metadata.get("info", "{}")), str(source))

    # ---- as a method parameter: JSON-able, so results and dataset runs can record it ---------------------------

    def reference(self) -> dict[str, Any]:
        """What a method's parameters keep: the file and its digest, or the weights themselves when unsaved."""
        kept: dict[str, Any] = {"digest": self.digest, "fingerprint": self.fingerprint, "rows": self.rows}
        if self.path is not None:
            return {"path": self.path, **kept}
        return {**kept, "model_type": self.model_type, "head_weights": self.head_weights.tolist()}

    @classmethod
    def from_reference(cls, reference: dict[str, Any]) -> "At2Weights":
        """The weights a ``reference()`` names (read again from their file, which must not have changed)."""
        if "head_weights" in reference:
            return cls(np.asarray(reference["head_weights"]), reference["fingerprint"],
                       reference.get("model_type", ""), reference["rows"])
        weights = cls.load(reference["path"])
        if weights.digest != reference["digest"]:
            raise InvalidInputError(f"the AT2 weights file {reference['path']!r} changed since it was given")
        return weights


def weights_reference(value: Any) -> Optional[dict[str, Any]]:
    """The ``weights=`` parameter (a path, ``At2Weights``, or a reference) as a checked, JSON-able reference."""
    if value is None:
        return None
    if isinstance(value, At2Weights):
        return value.reference()
    if isinstance(value, (str, os.PathLike)):
        return At2Weights.load(value).reference()
    if isinstance(value, dict) and {"digest", "fingerprint", "rows"} <= set(value):
        return At2Weights.from_reference(value).reference()
    raise ValueError(f"must be a path to weights saved by train_at2 or the At2Weights it returned, got "
                     f"{type(value).__name__}")


# ---- the features and the fit -------------------------------------------------------------------------------------


def head_scores(model: Any, model_input: Any, features: Sequence[Any], rows: QueryRows = "predicting",
                max_memory: Optional[int] = None, **forward: Any) -> torch.Tensor:
    """(n_layers, n_heads, n_target, n_features) attention from the target's rows to each feature's tokens (summed
    over its tokens), from one forward pass."""
    if not features:
        raise NoAttributableFeaturesError("there are no features to attribute to")
    membership = torch.zeros((model_input.length, len(features)), dtype=torch.float32)
    for column, feature in enumerate(features):
        membership[list(feature.token_positions), column] = 1.0
    return read_attention(model, model_input.input_ids, query_rows(model_input, rows), columns=membership,
                          max_memory=max_memory, **forward)


def fit_head_weights(features: Sequence[np.ndarray], masks: Sequence[np.ndarray], outputs: Sequence[np.ndarray], *,
                     steps: int = 300, learning_rate: float = 0.3) -> np.ndarray:
    """Head weights w (F,) maximising the mean Pearson correlation, over each example's ablations, between
    w . ((2 m - 1) @ a) and the ablations' scores.

    ``features[e]`` (S_e, F): example e's per-source, per-head attention scores; ``masks[e]`` (M_e, S_e) booleans
    (True: source kept); ``outputs[e]`` (M_e,) the explained scores. Examples whose scores do not vary tell nothing
    and are skipped. Adam from w = 1 / F, in whitened coordinates (``_whitening``) with a first step of
    ``learning_rate`` times the start's mean size, cosine-annealed over ``steps``, gradients clipped at norm 1; w is
    returned with L1 norm 1. Deterministic: no randomness.
    """
    designs, targets = [], []
    for a, m, y in zip(features, masks, outputs):
        y = np.asarray(y, dtype=np.float64)
        if len(y) < 2 or np.ptp(y) <= 1e-12 * max(1.0, float(np.abs(y).max())):
            continue
        signed = 2.0 * np.asarray(m, dtype=np.float64) - 1.0
        designs.append(torch.as_tensor(signed @ np.asarray(a, dtype=np.float64), dtype=torch.float32))
        targets.append(torch.as_tensor((y - y.mean()) / y.std(), dtype=torch.float32))
    if not designs:
        raise InvalidInputError("no training document's ablations changed its score: AT2 has nothing to learn from; "
                                "use documents with several sentences that the answer depends on")
    n_features = int(designs[0].shape[1])
    whiten = _whitening(designs)
    designs = [design @ whiten for design in designs]
    start = torch.linalg.solve(whiten, torch.full((n_features,), 1.0 / n_features))  # w = 1 / F, ...
    coordinates = (start / start.norm()).requires_grad_(True)  # ... at unit size: the correlation ignores scale
    optimizer = torch.optim.Adam([coordinates], lr=learning_rate / n_features ** 0.5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = -torch.stack([_correlation(design @ coordinates, target)
                             for design, target in zip(designs, targets)]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([coordinates], max_norm=1.0)
        optimizer.step()
        schedule.step()
    weights = whiten @ coordinates.detach()
    fitted = weights.detach().double().numpy()
    return fitted / max(np.abs(fitted).sum(), 1e-30)


def _whitening(designs: Sequence[torch.Tensor], floor: float = WHITENING_FLOOR) -> torch.Tensor:
    """(F, F) matrix P with w = P c: in the coordinates c the pooled, per-example centred features have unit
    covariance, so Adam's steps are alike in every direction (a change of variables: the objective and its optima in
    w are the same). Directions whose variance is below ``floor`` x the largest are not stretched beyond that."""
    centred = torch.cat([design - design.mean(dim=0) for design in designs]).double()
    covariance = centred.T @ centred / max(int(centred.shape[0]), 1)
    values, vectors = torch.linalg.eigh(covariance)
    values = values.clamp(min=floor * float(values.max().clamp(min=1e-300)))
    return (vectors @ torch.diag(values.rsqrt()) @ vectors.T).float()


def _correlation(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two vectors (the target already standardised)."""
    centred = predicted - predicted.mean()
    return (centred * target).mean() / (centred.pow(2).mean().sqrt() + 1e-12)
