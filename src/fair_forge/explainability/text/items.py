"""The items ``explain_batch``, ``iter_explain`` and ``faithfulness`` take: a (messages or prompt, target) pair, or a
dict with ``messages``, ``prompt`` or ``question`` and ``target`` (alias ``answer``), and optionally
``contrast_target`` and ``counterfactual``; a batch is a list or any iterable of them, or a pandas DataFrame with those
columns."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from ..errors import InvalidInputError
from .prompt import Messages


def batch_items(items: Any) -> list[Any]:
    """The items of a list/iterable, or the rows of a pandas DataFrame as dicts."""
    if hasattr(items, "to_dict") and hasattr(items, "columns"):
        return items.to_dict(orient="records")
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
        raise InvalidInputError("items must be a list of (messages_or_prompt, target) pairs or dicts, or a DataFrame")
    return list(items)


def item_options(item: Any) -> dict[str, Any]:
    """The optional fields of a dict item: ``contrast_target`` and ``counterfactual`` (missing, None or a
    DataFrame's NaN: not given)."""
    if not isinstance(item, Mapping):
        return {"contrast_target": None, "counterfactual": None, "target_span": None}
    return {name: None if _missing(item.get(name)) else item.get(name)
            for name in ("contrast_target", "counterfactual", "target_span")}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def item_fields(item: Any) -> tuple[Optional[Messages], Optional[str], Any]:
    """(messages, prompt, target) of one batch item; a typed error for an item of the wrong shape."""
    if isinstance(item, Mapping):
        target = item.get("target", item.get("answer"))
        if "messages" in item:
            return item["messages"], None, target
        if "prompt" in item:
            return None, item["prompt"], target
        if "question" in item:
            return [{"role": "user", "content": item["question"]}], None, target
        raise InvalidInputError(f"item needs 'messages', 'prompt' or 'question', got keys {sorted(item)}")
    if isinstance(item, (tuple, list)) and len(item) == 2:
        source, target = item
        if isinstance(source, str):
            return None, source, target
        return source, None, target
    raise InvalidInputError(f"item must be a (messages_or_prompt, target) pair or a dict, got {item!r}")
