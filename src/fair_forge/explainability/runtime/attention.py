"""Attention weights of a few query rows, read during one ordinary forward pass of the model.

Attention-based methods need, for the positions that produce the target, the attention weights to every key of
every head of every layer: an (n_layers, n_heads, n_rows, n) tensor, never the n x n maps. Transformers' attention
modules (every family of tests/zoo.py) compute their queries and keys (rotary embeddings and q/k norms applied) and
hand them to ``attention_interface(module, query, key, value, attention_mask, scaling=..., **kwargs)``, looked up
through ``AttentionInterface.get_interface``. While ``read_attention`` runs, that lookup returns the model's own
implementation (sdpa, flash, eager: whatever ``config._attn_implementation`` says) wrapped by a recorder which, for
the borrowed model's attention modules only, computes softmax(q k^T * scaling [softcapped] + mask [+ sinks]) for the
asked rows in float32 and then calls the implementation unchanged. The model's output and implementation are those of
a plain forward pass; nothing is stored but the asked rows (no keys, no values, no full map); the class attribute is
restored in ``finally``.

Rows: ``predicting_rows`` are the positions whose outputs are the target tokens' log-probs (``target_start - 1 ...
length - 2``), the default of the methods, because they are the rows through which the context reaches the explained
score; ``target_rows`` are the target tokens themselves (``target_start ... length - 1``), what AT2's reference
implementation reads.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Optional, Sequence

import numpy as np
import torch

from ..errors import InvalidInputError, UnsupportedModelError
from ..text.prompt import ModelInput
from .memory import MemoryBudgetWarning, call_estimate, memory_budget

QueryRows = Literal["predicting", "target"]
QUERY_ROWS: tuple[str, ...] = ("predicting", "target")


@dataclass(frozen=True)
class AttentionArguments:
    """Keyword arguments through which transformers' attention modules pass what changes their weights."""

    scaling: str = "scaling"
    sliding_window: str = "sliding_window"  # also encoded in a 4-d mask, when the model builds one
    softcap: str = "softcap"  # Gemma 2: logits -> softcap * tanh(logits / softcap), before the mask
    sinks: str = "s_aux"  # gpt-oss: one learned logit per head in the softmax's denominator
    position_bias: str = "position_bias"  # added to the logits (T5-style relative biases)
    is_causal: str = "is_causal"


ARGUMENTS = AttentionArguments()

#: Families whose attention modules compute their weights themselves (ALiBi biases inside the module) instead of
#: calling the attention interface: refused up front, with the reason.
NO_ATTENTION_INTERFACE: dict[str, str] = {
    "bloom": "Bloom adds ALiBi biases inside its attention module, which does not call the attention interface",
    "falcon": "Falcon computes attention inside its module (ALiBi or rotary), without the attention interface",
    "mpt": "MPT adds ALiBi biases inside its attention module, which does not call transformers' attention interface",
}

_LOCK = threading.Lock()
_RECORDERS: dict[int, "_Recorder"] = {}  # id(attention module) -> the recorder reading it
_ORIGINAL: Optional[Callable[..., Any]] = None  # AttentionInterface.get_interface while a recorder is installed


def query_rows(model_input: ModelInput, rows: QueryRows = "predicting") -> np.ndarray:
    """Positions whose attention rows are read: those predicting the target tokens, or the target tokens."""
    if rows not in QUERY_ROWS:
        raise InvalidInputError(f"rows must be one of {QUERY_ROWS}, got {rows!r}")
    start = model_input.target_start - (1 if rows == "predicting" else 0)
    return np.arange(start, start + model_input.n_target)


def check_attention_model(model: Any) -> None:
    """A typed error, before any model call, for a model whose attention cannot be read this way."""
    from transformers.modeling_utils import AttentionInterface

    if "get_interface" not in AttentionInterface.__dict__:  # transformers before 5: modules index the mapping
        raise UnsupportedModelError("attention methods read queries and keys through "
                                    "AttentionInterface.get_interface, which this transformers version lacks; "
                                    "upgrade transformers or use a perturbation or gradient method")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in NO_ATTENTION_INTERFACE:
        raise UnsupportedModelError(f"{NO_ATTENTION_INTERFACE[model_type]}; attention methods cannot read its weights: "
                                    "use a perturbation or gradient method instead")
    if config is None or not hasattr(config, "_attn_implementation"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers model with an attention implementation; attention methods "
            "read transformers' attention interface: use a perturbation or gradient method instead")


class _Recorder:
    """The attention weights of ``rows`` of every layer of one forward pass, optionally summed into ``columns``."""

    def __init__(self, rows: torch.Tensor, columns: Optional[torch.Tensor]) -> None:
        self.rows = rows
        self.columns = columns
        self.layers: list[tuple[int, torch.Tensor]] = []  # (call order or layer_idx, (H, R, n or F))

    def record(self, module: Any, query: torch.Tensor, key: torch.Tensor, mask: Optional[torch.Tensor],
               kwargs: dict[str, Any]) -> None:
        weights = row_weights(module, query, key, mask, self.rows.to(query.device), kwargs)[0]
        if self.columns is not None:
            weights = weights @ self.columns.to(weights.device)
        index = getattr(module, "layer_idx", None)
        self.layers.append((len(self.layers) if not isinstance(index, int) else index, weights))


def row_weights(module: Any, query: torch.Tensor, key: torch.Tensor, mask: Optional[torch.Tensor],
                rows: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """(B, H, R, kv) float32 attention weights of query ``rows`` (positions in the sequence), as the module's eager
    implementation computes them: grouped key heads repeated, scaled, softcapped, masked (the model's own mask, or a
    causal one with the sliding window), position bias added, sinks in the denominator."""
    n_heads, n_kv_heads = int(query.shape[1]), int(key.shape[1])
    q_length, kv_length = int(query.shape[2]), int(key.shape[2])
    local = rows - (kv_length - q_length)  # the rows among this call's queries (a cache holds the earlier keys)
    if bool((local < 0).any()) or bool((local >= q_length).any()):
        raise InvalidInputError(f"query rows {rows.tolist()} are not among this call's {q_length} queries")
    queries = query[:, :, local].float()
    keys = key.float()
    if n_heads != n_kv_heads:
        keys = keys.repeat_interleave(n_heads // n_kv_heads, dim=1)
    scaling = kwargs.get(ARGUMENTS.scaling)
    logits = queries @ keys.transpose(-1, -2) * (float(scaling) if scaling is not None else query.shape[-1] ** -0.5)
    softcap = kwargs.get(ARGUMENTS.softcap)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if mask is not None and mask.dim() == 4:  # the model's own: causal, padding, sliding window, as it runs
        rows_mask = (mask[:, :, local] if mask.shape[2] == q_length else mask)[..., :kv_length]  # or one row for all
        logits = logits.masked_fill(~rows_mask, float("-inf")) if rows_mask.dtype == torch.bool \
            else logits + rows_mask.float()
    else:  # none built (sdpa's causal fast path, flash): causal, the window, and a 2-d padding mask if given
        keys_at = torch.arange(kv_length, device=logits.device)
        allowed = torch.ones((len(rows), kv_length), dtype=torch.bool, device=logits.device)
        if kwargs.get(ARGUMENTS.is_causal, getattr(module, "is_causal", True)):
            allowed &= keys_at[None, :] <= rows[:, None]
        window = kwargs.get(ARGUMENTS.sliding_window)
        if isinstance(window, int) and window > 0:
            allowed &= keys_at[None, :] > rows[:, None] - window
        logits = logits.masked_fill(~allowed, float("-inf"))
        if mask is not None and mask.dim() == 2:
            logits = logits.masked_fill(~mask.bool()[:, None, None, :kv_length], float("-inf"))
    bias = kwargs.get(ARGUMENTS.position_bias)
    if isinstance(bias, torch.Tensor):
        logits = logits + bias[:, :, local].float()
    sinks = kwargs.get(ARGUMENTS.sinks)
    if isinstance(sinks, torch.Tensor):
        sink = sinks.float().reshape(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
        return torch.cat([logits, sink], dim=-1).softmax(-1)[..., :-1]
    return logits.softmax(-1)


def _recording_get_interface(self: Any, *args: Any, **kwargs: Any) -> Callable[..., Any]:
    """``AttentionInterface.get_interface`` while a capture runs: the usual function, wrapped by the recorder."""
    function = _ORIGINAL(self, *args, **kwargs)  # type: ignore[misc]

    def recording(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Optional[torch.Tensor], *rest: Any, **options: Any) -> Any:
        recorder = _RECORDERS.get(id(module))
        if recorder is not None:
            recorder.record(module, query, key, attention_mask, options)
        return function(module, query, key, value, attention_mask, *rest, **options)

    return recording


@contextlib.contextmanager
def _recording(modules: Sequence[torch.nn.Module], recorder: _Recorder) -> Iterator[None]:
    """Route the attention calls of ``modules`` (the borrowed model's; other models' calls pass untouched) through
    ``recorder`` while the block runs; the class attribute is restored in ``finally``."""
    global _ORIGINAL
    from transformers.modeling_utils import AttentionInterface

    with _LOCK:
        if any(id(module) in _RECORDERS for module in modules):
            raise InvalidInputError("the attention of this model is already being read (nested or concurrent call)")
        if _ORIGINAL is None:
            _ORIGINAL = AttentionInterface.__dict__["get_interface"]
            AttentionInterface.get_interface = _recording_get_interface
        _RECORDERS.update({id(module): recorder for module in modules})
    try:
        yield
    finally:
        with _LOCK:
            for module in modules:
                _RECORDERS.pop(id(module), None)
            if not _RECORDERS and _ORIGINAL is not None:
                AttentionInterface.get_interface = _ORIGINAL
                _ORIGINAL = None


def n_attention_layers(model: Any) -> int:
    """Decoder layers (each with one self-attention) from the model's config."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer"))


def capture_bytes(model: Any, length: int, n_rows: int, n_columns: Optional[int] = None) -> int:
    """Memory of a capture beyond the forward pass: the kept weights and one layer's float32 temporaries."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head"))
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kept = n_attention_layers(model) * heads * n_rows * (n_columns or length) * 4
    return kept + 3 * heads * n_rows * length * 4 + 2 * heads * length * head_dim * 4


def read_attention(model: Any, input_ids: torch.Tensor, rows: Sequence[int], *,
                   columns: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                   max_memory: Optional[int] = None, keep_logits: int = 1,
                   outputs: Optional[list] = None) -> torch.Tensor:
    """(n_layers, n_heads, R, n) float32 attention weights from positions ``rows`` of ``input_ids`` (n,) to every
    position, on the model's device, from one forward pass of the model as it is (its attention implementation kept).

    With ``columns`` (n, F), each layer's rows are multiplied by it as they come (e.g. summed over each feature's
    tokens: a 0/1 membership matrix), so the result is (n_layers, n_heads, R, F) and (.., n) is never kept for more
    than one layer. ``attention_mask`` (n,) marks padding (0). ``outputs``, a list, receives the forward's logits of
    the last ``keep_logits`` positions (the explained score comes from the same pass). Warns (``MemoryBudgetWarning``) when the forward pass
    and the kept weights together need more than ``max_memory`` (default: ``memory.memory_budget``).
    """
    check_attention_model(model)
    ids = torch.as_tensor(input_ids).reshape(-1)
    length = int(ids.shape[0])
    positions = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    if positions.ndim != 1 or len(positions) == 0 or int(positions.min()) < 0 or int(positions.max()) >= length:
        raise InvalidInputError(f"rows must be positions in [0, {length}), got {list(rows)!r}")
    if columns is not None and (columns.ndim != 2 or int(columns.shape[0]) != length):
        raise InvalidInputError(f"columns must have shape ({length}, F), got {tuple(columns.shape)}")
    _check_budget(model, length, len(positions), None if columns is None else int(columns.shape[1]), max_memory)
    device = next(model.parameters()).device
    recorder = _Recorder(positions.to(device), None if columns is None else columns.to(device, torch.float32))
    kwargs: dict[str, Any] = {"use_cache": False}
    if "logits_to_keep" in _forward_parameters(model):
        kwargs["logits_to_keep"] = keep_logits  # only the positions asked for go through the output layer
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(attention_mask).reshape(1, -1).to(device)
    with _recording(list(model.modules()), recorder), torch.no_grad():
        output = model(input_ids=ids.reshape(1, -1).to(device), **kwargs)
    if outputs is not None:
        outputs.append(output.logits[0, -keep_logits:])
    expected = n_attention_layers(model)
    if len(recorder.layers) != expected:
        raise UnsupportedModelError(
            f"{type(model).__name__} made {len(recorder.layers)} attention calls through transformers' attention "
            f"interface for its {expected} layers, so its attention weights cannot be read this way (its attention "
            "modules compute them themselves); use a perturbation or gradient method instead")
    layers = [weights for _, weights in sorted(recorder.layers, key=lambda item: item[0])]
    if len({tuple(weights.shape) for weights in layers}) != 1:
        raise UnsupportedModelError(f"{type(model).__name__}'s layers have different numbers of heads; attention "
                                    "methods need one shape for every layer")
    return torch.stack(layers)


def _forward_parameters(model: Any) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _check_budget(model: Any, length: int, n_rows: int, n_columns: Optional[int], max_memory: Optional[int]) -> None:
    """Warn when the capture's forward pass plus its kept weights exceed the memory budget of a model call."""
    try:
        forward = call_estimate(model, length=length, n_target=1, grad=False).bytes_per_row
    except InvalidInputError:
        return  # no sizes in the config: nothing to estimate
    needed = forward + capture_bytes(model, length, n_rows, n_columns)
    budget = memory_budget(model, max_memory)
    if needed > budget:
        warnings.warn(f"reading the attention of {n_rows} rows over {length} tokens needs about {needed / 2**30:.2f} "
                      f"GiB, more than max_memory={budget / 2**30:.2f} GiB; it runs anyway (one forward pass). A "
                      "shorter input or target lowers it.", MemoryBudgetWarning, stacklevel=3)
