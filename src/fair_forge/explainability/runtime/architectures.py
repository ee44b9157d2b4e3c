"""What the library needs to know about a model's architecture, kept as data rather than name checks.

One table, keyed by the config's ``model_type``, says where a model keeps its stack of decoder (or encoder) layers;
the functions below read the few other facts every call needs (the name of the cache argument, the sliding window,
the context length, the output layer) from the model and its config, falling back on a structural search for models
the table does not name. A new architecture that needs a quirk is one more row of ``ARCHITECTURES``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..errors import InvalidInputError, UnsupportedModelError


@dataclass(frozen=True)
class Architecture:
    """Where a family of models keeps its layers (dotted attribute paths from the loaded model)."""

    decoder_layers: Optional[str] = None  # from the causal-LM class, e.g. "model.layers"
    encoder_layers: Optional[str] = None  # from the bare encoder (a sentence-transformer's auto_model)


ARCHITECTURES: dict[str, Architecture] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo",
                     "olmo2", "smollm3", "granite"), Architecture(decoder_layers="model.layers")),
    "gpt2": Architecture(decoder_layers="transformer.h", encoder_layers="h"),
    "gpt_neox": Architecture(decoder_layers="gpt_neox.layers"),
    **dict.fromkeys(("bert", "roberta", "mpnet", "xlm-roberta", "electra"), Architecture(encoder_layers="encoder.layer")),
    "t5": Architecture(encoder_layers="encoder.block"),
    "bart": Architecture(encoder_layers="encoder.layers"),
    "distilbert": Architecture(encoder_layers="transformer.layer"),
}
# encoders the table does not name: the usual places, first found wins
ENCODER_LAYER_PATHS: tuple[str, ...] = ("encoder.layer", "encoder.block", "encoder.layers", "transformer.layer",
                                        "layers", "model.layers", "h")
CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def architecture(model: Any) -> Architecture:
    """The table's row for ``model``'s ``config.model_type`` (an empty row for a type it does not name)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return ARCHITECTURES.get(model_type, Architecture())


def resolve_path(root: nn.Module, path: str, what: str) -> Any:
    """``root.a.b.c`` for ``path="a.b.c"``, or a typed error naming ``what`` could not be found."""
    current: Any = root
    for part in path.split("."):
        if not hasattr(current, part):
            raise UnsupportedModelError(f"could not find the {what} at {path!r} of {type(root).__name__}")
        current = getattr(current, part)
    return current


def decoder_layers(model: Any) -> nn.ModuleList:
    """The model's stack of decoder layers: the table's path, else its longest ``ModuleList``."""
    path = architecture(model).decoder_layers
    if path is not None:
        layers = resolve_path(model, path, "decoder layers")
        if isinstance(layers, nn.ModuleList):
            return layers
    stacks = [module for module in model.modules() if isinstance(module, nn.ModuleList)]
    if not stacks:
        raise InvalidInputError(f"{type(model).__name__} has no list of layers to checkpoint; use checkpoint=False")
    return max(stacks, key=len)


def encoder_layers(hf_model: nn.Module, path: Optional[str] = None) -> nn.ModuleList:
    """The encoder's list of layers: ``path`` if given, else the table's, else the first usual place that exists."""
    if path:
        layers = resolve_path(hf_model, path, "encoder layers")
        if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
            raise UnsupportedModelError(f"{path!r} of {type(hf_model).__name__} is not a list of layers")
        return layers
    known = architecture(hf_model).encoder_layers
    for candidate in ((known,) if known else ()) + ENCODER_LAYER_PATHS:
        try:
            layers = resolve_path(hf_model, candidate, "encoder layers")
        except UnsupportedModelError:
            continue
        if isinstance(layers, (nn.ModuleList, nn.Sequential)) and len(layers) > 0:
            return layers
    raise UnsupportedModelError(
        f"could not find the encoder layers of {type(hf_model).__name__} (looked at {list(ENCODER_LAYER_PATHS)}); "
        "pass encoder_layers_path='path.to.layers'"
    )


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


def model_context_length(model: Any) -> Optional[int]:
    """The model's maximum sequence length from its config, if it states one."""
    config = getattr(model, "config", None)
    for name in CONTEXT_LENGTH_KEYS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def output_layer(model: Any) -> Optional[torch.nn.Module]:
    """The model's output (vocabulary) layer, if it exposes one through ``get_output_embeddings``."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, torch.nn.Module) else None


def keeps_logits(model: Any) -> bool:
    """Whether ``model.forward`` can compute the logits of the last positions only (``logits_to_keep``)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters
