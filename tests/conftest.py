"""Shared fixtures: tiny random causal LMs with tokenizers trained in memory (milliseconds, no downloads)."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# Tiny models are fastest on one thread, and on shared 2-core machines more threads only contend (200 ms vs 3 ms
# for a tiny forward pass, measured). Results depend on it only in rounding, which CI checks by running the engine
# and evaluation tests again with FAIR_FORGE_TEST_THREADS=2 and FAIR_FORGE_TEST_DETERMINISTIC=1
# (torch.use_deterministic_algorithms: an op without a deterministic kernel raises instead of running).
torch.set_num_threads(int(os.environ.get("FAIR_FORGE_TEST_THREADS", "1")))
if os.environ.get("FAIR_FORGE_TEST_DETERMINISTIC", "0") not in ("", "0"):
    torch.use_deterministic_algorithms(True)
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import fair_forge.explainability

PACKAGE_DIR = str(Path(fair_forge.explainability.__file__).resolve().parent)


def _called_by_the_package() -> bool:
    """Whether fair_forge's code is on the stack above the warning, not counting a module being imported between
    them (a library importing its own modules lazily warns about itself, not about our call)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(PACKAGE_DIR):
            return True
        if frame.f_code.co_name == "<module>":
            return False
        frame = frame.f_back
    return False


@pytest.fixture(autouse=True)
def library_deprecations_are_errors():
    """A FutureWarning or DeprecationWarning raised while fair_forge's code is on the stack fails the test.

    A filter such as ``error::FutureWarning:fair_forge`` only sees the frame a warning is attributed to, and a
    library's ``stacklevel`` often lands elsewhere (transformers' past_key_values warning lands in torch's
    ``Module.__call__``), so the stack itself is inspected. Every other warning goes to pytest's record as before.
    """
    record = warnings._showwarnmsg_impl  # pytest's recorder for this test

    def check(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (FutureWarning, DeprecationWarning)) and _called_by_the_package():
            raise category(f"deprecated call made by fair_forge: {message} ({filename}:{lineno})")
        record(warnings.WarningMessage(message, category, filename, lineno, file, line))

    with warnings.catch_warnings():
        warnings.showwarning = check
        yield


CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Paris is a city in France. Berlin is the capital of Germany.",
    "The quick brown fox jumps over the lazy dog. Dogs and cats are friends!",
    "Explain why the sky is blue. Light scatters in the atmosphere; blue light scatters more.",
    "You are a helpful assistant. Answer the question in one short sentence.",
    "Numbers like 42, 3.14 and 2026 appear too, with café, naïve and 東京.",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "<pad>"]


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE (tokens carry a leading 'Ġ' for a space), with a ChatML chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """Llama/SentencePiece style BPE (tokens carry '▁' for a space), adds BOS, no chat template."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    return _byte_level_tokenizer()


@pytest.fixture(scope="session")
def llama_tokenizer() -> PreTrainedTokenizerFast:
    return _metaspace_tokenizer()


def make_tiny_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=2
    )
    return GPT2LMHeadModel(config).eval()


def make_tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_gpt2(gpt2_tokenizer):
    """(model, tokenizer): 2-layer GPT-2 with hidden size 32 and a ChatML-templated byte-level tokenizer."""
    return make_tiny_gpt2(len(gpt2_tokenizer)), gpt2_tokenizer


@pytest.fixture
def tiny_llama(llama_tokenizer):
    """(model, tokenizer): 2-layer Llama with hidden size 32 and a '▁' BPE tokenizer without chat template."""
    return make_tiny_llama(len(llama_tokenizer)), llama_tokenizer


@pytest.fixture
def saved_tiny_model(tiny_gpt2, tmp_path: Path) -> Path:
    """The tiny GPT-2 (ChatML template) saved as a local folder, for the command line's --model."""
    model, tokenizer = tiny_gpt2
    folder = tmp_path / "tiny-gpt2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(params=["gpt2", "llama"])
def tiny_lm(request, gpt2_tokenizer, llama_tokenizer):
    """Both tiny architectures, for tests that must hold for any causal LM."""
    if request.param == "gpt2":
        return make_tiny_gpt2(len(gpt2_tokenizer)), gpt2_tokenizer
    return make_tiny_llama(len(llama_tokenizer)), llama_tokenizer


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): the embedded SmolLM2-135M-Instruct, from the default cache (converted on first use)."""
    from fair_forge.explainability import load_default_model

    return load_default_model()


@pytest.fixture(scope="session")
def smollm2_float64(smollm2):
    """(model, tokenizer): a float64 copy of the embedded SmolLM2 (1.1 GB), for identities checked beyond float32's
    rounding (``tests/tolerances.py``); the float32 session model is left as it is."""
    import copy

    from tolerances import to_float64

    model, tokenizer = smollm2
    return to_float64(copy.deepcopy(model)), tokenizer
