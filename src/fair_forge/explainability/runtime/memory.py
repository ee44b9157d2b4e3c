"""How much memory a model call keeps, and how many rows fit a budget.

A gradient call (forward + backward w.r.t. the input embeddings) keeps every layer's activations until the backward
pass reaches it: for each row and each new token, a few hidden-sized and intermediate-sized tensors per layer, the
key/values of the whole sequence, and, with eager attention, the attention weights, which grow with rows x heads x
length x (prefix + length) x layers. A no-grad forward keeps only one layer's tensors at a time, plus the cache.
``call_estimate`` reads these sizes from a transformers config (``ModelShape``) and returns bytes per row;
``rows_per_call`` turns that and a budget (``max_memory``, by default a fraction of the free memory of the device the
model is on) into rows per call, down to one, and warns (``MemoryBudgetWarning``) when even one row is over budget.

The estimate is an upper bound of the peak allocated during the call, within 2x for the tested models
(tests/test_memory.py measures it with the torch profiler's allocation events on the CPU). Weights and the prefix
cache kept between calls are not counted: they exist whatever the rows per call.

``checkpointed_layers`` is the way out when one row does not fit (``TargetScorer(checkpoint=None)``, the default,
takes it by itself once one row's backward pass is estimated over the call budget): it runs each decoder layer under
``torch.utils.checkpoint`` for the duration of a ``with`` block, so a backward pass keeps only the layers' inputs and
recomputes one layer at a time. The model's own ``gradient_checkpointing_enable`` is not used: it changes the model
and works only in training mode, where dropout would change the scores. Checkpointed layers recompute their forward
in the backward pass, so they must not write a key/value cache: gradient calls under it run without a prefix cache.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from ..errors import InvalidInputError
from .architectures import decoder_layers

# max_memory=None: a fraction of the free memory where the model runs. On a GPU, more rows per call run in parallel,
# so calls may take half of the free device memory; on the CPU a call of one long row is already compute-bound and
# more rows buy no speed, while the machine's memory is shared with everything else: a twentieth of what is available
# (about 1.1 GiB on an idle 24 GiB machine).
CUDA_MEMORY_FRACTION = 0.5
CPU_MEMORY_FRACTION = 0.05
# checkpoint=None checkpoints gradient calls once one row's backward pass is estimated over the call budget, and on
# the CPU (max_memory not given) already over CPU_CHECKPOINT_BYTES: a CPU call of a thousand tokens is compute-bound,
# so keeping every layer's activations buys no speed there, while checkpointing costs one more forward per call
# (1.15x the time; 3.1 GB against 1.56 GB peak RSS: integrated gradients, SmolLM2, a 1.3k-token document). A fixed
# number, so that whether a CPU run checkpoints does not depend on how much memory the machine has free.
CPU_CHECKPOINT_BYTES = 2**30
# attention implementations that never materialize the (rows, heads, length, keys) attention weights
FUSED_ATTENTION = frozenset({"sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "paged_attention"})
# activations computed by one kernel (saving one intermediate-sized tensor); others (e.g. GPT-2's "gelu_new", a chain
# of elementwise ops) save several
FUSED_ACTIVATIONS = frozenset({"silu", "swish", "relu", "gelu", "gelu_pytorch_tanh", "quick_gelu"})
# intermediate-sized tensors a gated (Llama) or plain (GPT-2) MLP keeps per token for the backward pass
GATED_MLP_TENSORS, PLAIN_MLP_TENSORS, UNFUSED_ACTIVATION_TENSORS = 4, 2, 5
HIDDEN_TENSORS_PER_LAYER = 10  # norms, residuals, projections' outputs, attention output: hidden-sized, per token
LOGIT_COPIES = 4  # kept logits in float32: the logits, their float copy, the softmax and its gradient


class MemoryBudgetWarning(UserWarning):
    """Even one row of a model call needs more memory than ``max_memory``; the call runs anyway, one row at a time."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a causal LM that decide its activation memory, read from its transformers config."""

    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    bytes_per_value: int  # the model's dtype
    eager_attention: bool  # attention weights materialized and kept for backward
    gated_mlp: bool
    fused_activation: bool

    @classmethod
    def of(cls, model: Any) -> "ModelShape":
        """The shape of ``model`` (a transformers causal LM); a typed error when its config lacks the sizes."""
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            config = config.get_text_config()
        try:
            hidden = int(config.hidden_size)
            layers = int(config.num_hidden_layers)
            heads = int(config.num_attention_heads)
        except (AttributeError, TypeError) as error:
            raise InvalidInputError(
                f"cannot estimate the memory of {type(model).__name__}: its config has no hidden_size, "
                "num_hidden_layers or num_attention_heads; pass batch_size to size model calls yourself"
            ) from error
        intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
        activation = getattr(config, "hidden_act", None) or getattr(config, "activation_function", "")
        implementation = getattr(config, "_attn_implementation", None) or "eager"
        parameter = next(model.parameters())
        return cls(
            n_layers=layers,
            hidden_size=hidden,
            intermediate_size=int(intermediate),
            n_heads=heads,
            n_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
            vocab_size=int(config.vocab_size),
            bytes_per_value=parameter.element_size(),
            eager_attention=implementation not in FUSED_ATTENTION,
            gated_mlp=hasattr(config, "intermediate_size") and not hasattr(config, "n_inner"),
            fused_activation=str(activation) in FUSED_ACTIVATIONS,
        )

    @property
    def mlp_tensors(self) -> int:
        """Intermediate-sized tensors the MLP keeps per token."""
        kept = GATED_MLP_TENSORS if self.gated_mlp else PLAIN_MLP_TENSORS
        return kept + (0 if self.fused_activation else UNFUSED_ACTIVATION_TENSORS - 1)


@dataclass(frozen=True)
class CallEstimate:
    """Bytes a model call needs per row (it grows linearly with the rows), and what it was computed for."""

    bytes_per_row: int
    length: int
    prefix: int
    grad: bool
    checkpoint: bool = False  # a backward pass through checkpointed layers

    def bytes_for(self, rows: int) -> int:
        return rows * self.bytes_per_row


def call_estimate(
    model: Any, *, length: int, prefix: int = 0, n_target: int = 1, grad: bool = True, checkpoint: bool = False
) -> CallEstimate:
    """Peak memory per row of a call over rows of ``length`` tokens after a cached ``prefix``, predicting
    ``n_target`` target tokens: forward + backward w.r.t. the inputs (``grad``), or a no-grad forward.

    With ``checkpoint`` (see ``checkpointed_layers``) a backward pass keeps each layer's input and one layer's
    activations at a time; it runs without a prefix cache, so ``prefix`` counts as part of the rows.
    """
    shape = ModelShape.of(model)
    if checkpoint and grad:
        length, prefix = length + prefix, 0
    keys = prefix + length
    value = shape.bytes_per_value
    layer_per_token = (HIDDEN_TENSORS_PER_LAYER * shape.hidden_size + shape.mlp_tensors * shape.intermediate_size
                       + (shape.n_heads + 2 * shape.n_kv_heads) * shape.head_dim) * value
    attention_bytes = 4 if value == 4 else 4 + value  # float32 softmax, and its copy in the model's dtype
    attention_per_layer = shape.n_heads * length * keys * attention_bytes if shape.eager_attention else 0
    cache = 2 * shape.n_kv_heads * shape.head_dim * (prefix + keys) * value * shape.n_layers  # copied prefix + grown
    scored = max(4, value)  # log-probs, inputs and their gradients: float32, or float64 for a float64 model
    logits = LOGIT_COPIES * (n_target + 1) * shape.vocab_size * scored
    embeddings = 3 * length * shape.hidden_size * scored  # float32 inputs, their model-dtype copy and their gradient
    mask = length * keys * 4  # the float attention mask some transformers versions build for sdpa (all layers share it)
    if not grad:  # some of one layer's tensors at a time, the cache of every layer, the logits and their softmax
        per_row = length * layer_per_token // 2 + 2 * attention_per_layer + cache + logits // 2 + mask
    elif checkpoint:  # every layer's input, one layer's activations recomputed at a time
        per_row = (shape.n_layers * length * shape.hidden_size * value
                   + 2 * (length * layer_per_token + attention_per_layer) + cache + logits + embeddings)
    else:
        per_row = (shape.n_layers * (length * layer_per_token + attention_per_layer) + 2 * attention_per_layer
                   + cache + logits + embeddings)
    return CallEstimate(int(per_row), length, prefix, grad, checkpoint and grad)


def available_memory(model: Any) -> int:
    """Free bytes where ``model`` runs: the CUDA device's free memory, else the machine's available memory."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency of the test tools, not of the library
        return _meminfo_available()


def _meminfo_available() -> int:
    """``MemAvailable`` from /proc/meminfo (Linux), else the physical memory size."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_max_memory(max_memory: Any) -> Optional[int]:
    """``max_memory`` (bytes, or None for the default budget), or a typed error."""
    if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1):
        raise InvalidInputError(f"max_memory must be a positive number of bytes or None, got {max_memory!r}")
    return max_memory


def memory_budget(model: Any, max_memory: Optional[int] = None) -> int:
    """``max_memory`` bytes when given (checked), else a fraction of the free memory now (``CUDA_MEMORY_FRACTION``
    of the device's for a model on CUDA, ``CPU_MEMORY_FRACTION`` of the machine's otherwise)."""
    if check_max_memory(max_memory) is not None:
        return max_memory
    on_cuda = next(model.parameters()).device.type == "cuda"
    return int((CUDA_MEMORY_FRACTION if on_cuda else CPU_MEMORY_FRACTION) * available_memory(model))


def checkpoint_threshold(model: Any, max_memory: Optional[int] = None) -> int:
    """Bytes of one row's backward pass above which ``checkpoint=None`` checkpoints: ``max_memory`` when given, else
    the default call budget (``memory_budget``), on the CPU at most ``CPU_CHECKPOINT_BYTES``."""
    budget = memory_budget(model, max_memory)
    if max_memory is not None or next(model.parameters()).device.type == "cuda":
        return budget
    return min(budget, CPU_CHECKPOINT_BYTES)


def rows_per_call(estimate: CallEstimate, budget: int) -> int:
    """As many rows as ``budget`` bytes hold, at least one; warns when one row is already over budget."""
    rows = budget // max(estimate.bytes_per_row, 1)
    if rows >= 1:
        return int(rows)
    if estimate.grad and not estimate.checkpoint:
        advice = ("pass checkpoint=True, or leave checkpoint=None (the default), to keep one layer's activations at a "
                  "time (one more forward per call)")
    else:
        advice = "shorten the input or raise max_memory"
    warnings.warn(
        f"one row of {estimate.length} tokens after a {estimate.prefix}-token prefix needs about "
        f"{estimate.bytes_per_row / 2**30:.2f} GiB for a {'backward' if estimate.grad else 'forward'} pass, more than "
        f"max_memory={budget / 2**30:.2f} GiB; running one row per call. To stay within the budget, {advice}.",
        MemoryBudgetWarning,
        stacklevel=2,
    )
    return 1


@contextlib.contextmanager
def checkpointed_layers(model: Any) -> Iterator[None]:
    """Run every decoder layer of ``model`` under ``torch.utils.checkpoint`` while the block lasts (gradients on).

    Each layer gets an instance-level ``forward`` that wraps its own; they are deleted in ``finally``, so the model is
    exactly as before. Outside autograd (no-grad calls) the layers run as usual.
    """
    from torch.utils.checkpoint import checkpoint

    layers = list(decoder_layers(model))
    try:
        for layer in layers:
            original = layer.forward

            def forward(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                if not torch.is_grad_enabled():
                    return _original(*args, **kwargs)
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)

            layer.forward = forward
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
