"""The architecture zoo: tiny random causal LMs of the families users bring, built from configs (no downloads).

Each entry pairs a 2-layer model of hidden size 32 with a tokenizer trained in memory (milliseconds) that has the
special tokens its family's chat template needs, and that template copied verbatim from the family's released
tokenizer_config.json (tests/chat_templates.py; GPT-2 and GPT-NeoX/Pythia ship none: they are explained from a raw
prompt). Tests (tests/test_zoo.py), the benchmarks and docs/how-to/own-model.md's table all read the zoo from here::

    from zoo import ARCHITECTURES, build_zoo_model
    zoo_model = build_zoo_model("gemma3")            # ZooModel: model, tokenizer, example inputs
    explainer.explain(**zoo_model.example)          # messages=... (or prompt=...) and target=...

Outside pytest, put ``tests/`` on ``sys.path`` first (pytest does it for the test files). ``python tests/zoo.py``
rewrites the generated section of docs/how-to/own-model.md (tests/test_zoo.py checks that it is current).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from chat_templates import (GEMMA3_TEMPLATE, LLAMA3_TEMPLATE, MISTRAL_TEMPLATE, OLMO2_TEMPLATE, PHI3_TEMPLATE,
                            QWEN3_TEMPLATE)
from transformers import PreTrainedTokenizerFast

# ---- tokenizers trained in memory ------------------------------------------------------------------------------------

CORPUS = [
    "You are a helpful assistant. Answer the question in one short sentence.",
    "What is the capital of France? The capital of France is Paris.",
    "Why is the sky blue? Light scatters in the atmosphere; blue light scatters more.",
    "Name a fast animal. The cheetah is the fastest land animal.",
    "The quick brown fox jumps over the lazy dog.",
]

TokenizerStyle = Literal["byte", "metaspace"]


@dataclass(frozen=True)
class Vocabulary:
    """The special tokens of one family's tokenizer and which of them play the named roles."""

    special: tuple[str, ...]
    bos: Optional[str] = None
    eos: Optional[str] = None
    unk: Optional[str] = None
    pad: Optional[str] = None
    add_bos: bool = False  # prepend BOS when encoding raw text (SentencePiece families)


def train_tokenizer(style: TokenizerStyle, vocabulary: Vocabulary,
                    chat_template: Optional[str]) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on ``CORPUS``: GPT-2 style byte-level ("Ġ" marks a space) or SentencePiece style
    ("▁"), with ``vocabulary``'s special tokens (ids 0, 1, ... in order) and ``chat_template``."""
    if style == "byte":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=vocabulary.unk))
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=list(vocabulary.special), initial_alphabet=alphabet)
    tokenizer.train_from_iterator(CORPUS, trainer)
    if vocabulary.add_bos:
        bos_id = tokenizer.token_to_id(vocabulary.bos)
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{vocabulary.bos} $A",
                                                                 special_tokens=[(vocabulary.bos, bos_id)])
    elif style == "byte":
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    roles = {f"{name}_token": getattr(vocabulary, name) for name in ("bos", "eos", "unk", "pad")}
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **{k: v for k, v in roles.items() if v is not None})
    fast.chat_template = chat_template
    return fast


# ---- the zoo ---------------------------------------------------------------------------------------------------------

#: The size every zoo model shares: small enough that a forward + backward pass costs about a millisecond.
HIDDEN, LAYERS, HEADS, KV_HEADS = 32, 2, 4, 2
TINY = dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            max_position_embeddings=128)


def _config(name: str, tokenizer: PreTrainedTokenizerFast) -> Any:
    """The transformers config of the zoo's ``name`` model, with the tokenizer's vocabulary and special ids."""
    import transformers

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    grouped = dict(TINY, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS)
    if name == "gpt2":
        return transformers.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128, **ids)
    if name == "gpt_neox":
        return transformers.GPTNeoXConfig(**TINY, **ids)
    if name == "llama":
        return transformers.LlamaConfig(**grouped, **ids)
    if name == "gemma3":
        return transformers.Gemma3TextConfig(**grouped, **ids, query_pre_attn_scalar=HIDDEN // HEADS, sliding_window=8,
                                             layer_types=["sliding_attention", "full_attention"])
    if name == "qwen3":
        return transformers.Qwen3Config(**grouped, **ids, tie_word_embeddings=True)
    if name == "phi3":
        return transformers.Phi3Config(**TINY, num_key_value_heads=HEADS, original_max_position_embeddings=128, **ids)
    if name == "mistral":
        return transformers.MistralConfig(**grouped, **ids)
    if name == "olmo2":
        return transformers.Olmo2Config(**TINY, num_key_value_heads=HEADS, **ids)
    raise KeyError(name)


@dataclass(frozen=True)
class ZooEntry:
    """One architecture of the zoo: its model class, tokenizer and chat template, as its family ships them."""

    name: str
    model_class: str  # a transformers class name
    style: TokenizerStyle
    vocabulary: Vocabulary
    chat_template: Optional[str]
    template_source: str  # the released model whose chat template this is
    traits: str  # what the architecture brings that others do not
    system_role: bool = True  # whether the template takes a system message

    @property
    def has_template(self) -> bool:
        return self.chat_template is not None


_ENTRIES = (
    ZooEntry("gpt2", "GPT2LMHeadModel", "byte",
             Vocabulary(("<|endoftext|>",), bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>"), None,
             "none (raw prompt)", "learned absolute positions, LayerNorm, fused qkv (Conv1D)"),
    ZooEntry("llama", "LlamaForCausalLM", "byte",
             Vocabulary(("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>"), bos="<|begin_of_text|>", eos="<|eot_id|>"), LLAMA3_TEMPLATE,
             "Meta-Llama-3-8B-Instruct", "RoPE, RMSNorm, grouped-query attention"),
    ZooEntry("gemma3", "Gemma3ForCausalLM", "metaspace",
             Vocabulary(("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), bos="<bos>",
                        eos="<eos>", unk="<unk>", pad="<pad>", add_bos=True), GEMMA3_TEMPLATE,
             "gemma-3 instruct", "embeddings scaled by sqrt(hidden), (1 + w) RMSNorms, q/k norms, a sliding-window "
             "and a global layer; the system prompt folded into the first user turn"),
    ZooEntry("qwen3", "Qwen3ForCausalLM", "byte",
             Vocabulary(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|im_end|>", pad="<|endoftext|>"),
             QWEN3_TEMPLATE, "Qwen3", "q/k RMSNorms, tied embeddings; a template with tools and thinking"),
    ZooEntry("phi3", "Phi3ForCausalLM", "metaspace",
             Vocabulary(("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"),
                        bos="<s>", eos="<|end|>", unk="<unk>", pad="<|endoftext|>", add_bos=True), PHI3_TEMPLATE,
             "Phi-3-mini-4k-instruct", "fused qkv and gate/up projections"),
    ZooEntry("mistral", "MistralForCausalLM", "metaspace",
             Vocabulary(("<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", unk="<unk>", add_bos=True), MISTRAL_TEMPLATE,
             "Mistral-7B-Instruct-v0.1", "no system role; `[INST]` markers are plain text, not special tokens",
             system_role=False),
    ZooEntry("gpt_neox", "GPTNeoXForCausalLM", "byte",
             Vocabulary(("<|endoftext|>", "<|padding|>"), bos="<|endoftext|>", eos="<|endoftext|>",
                        unk="<|endoftext|>", pad="<|padding|>"), None,
             "none (raw prompt)", "parallel attention and MLP residuals, partial rotary embeddings"),
    ZooEntry("olmo2", "Olmo2ForCausalLM", "byte",
             Vocabulary(("<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"), bos="<|endoftext|>",
                        eos="<|endoftext|>", pad="<|pad|>"), OLMO2_TEMPLATE,
             "OLMo-2-1124-7B-Instruct", "RMSNorms after attention and MLP, q/k RMSNorms"),
)

#: What does not hold yet, by zoo architecture or method name (tests/test_zoo.py marks these strict xfails: when one
#: is fixed its test fails until the entry goes).
KNOWN_GAPS: dict[str, str] = {}

#: Integrated gradients' settings in the zoo's completeness test: the defaults (64 Gauss-Legendre nodes, then the
#: adaptive rule where they miss the tolerance, as on the RMSNorm families gemma3 and qwen3).
IG_COMPLETENESS_PARAMS: dict[str, Any] = {}
IG_TOLERANCE = 0.01  # relative completeness error |sum(scores) - (f(x) - f(baseline))| / |f(x) - f(baseline)|

ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in _ENTRIES}
#: Names of the zoo's architectures, in a fixed order.
ARCHITECTURES: tuple[str, ...] = tuple(ZOO)

SYSTEM = "You are a helpful assistant."
QUESTIONS = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Why is the sky blue?", "Light scatters in the atmosphere."),
    ("Name a fast animal.", "The cheetah is fast."),
)


@dataclass
class ZooModel:
    """A built zoo entry: the model (eval mode), its tokenizer, and inputs in the form the family takes."""

    entry: ZooEntry
    model: Any
    tokenizer: PreTrainedTokenizerFast

    def inputs(self, index: int = 0) -> dict[str, Any]:
        """Keyword arguments for ``explain``: ``messages`` (system + user where the template takes a system
        message) or ``prompt`` for families without a chat template, and ``target``."""
        question, answer = QUESTIONS[index]
        if not self.entry.has_template:
            return {"prompt": f"{SYSTEM} {question}", "target": answer}
        messages = [{"role": "user", "content": question}]
        if self.entry.system_role:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        return {"messages": messages, "target": answer}

    @property
    def example(self) -> dict[str, Any]:
        return self.inputs(0)


def build_zoo_model(name: str, seed: int = 0) -> ZooModel:
    """The zoo's ``name`` architecture with random weights drawn from ``seed`` (the global RNG is restored)."""
    import transformers

    entry = ZOO[name]
    tokenizer = train_tokenizer(entry.style, entry.vocabulary, entry.chat_template)
    model_class: Callable[[Any], Any] = getattr(transformers, entry.model_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(_config(name, tokenizer))
    return ZooModel(entry, model.eval(), tokenizer)


# ---- the generated section of docs/how-to/own-model.md ---------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
OWN_MODEL_PAGE = ROOT / "docs" / "how-to" / "own-model.md"
SECTION_BEGIN = "<!-- generated from tests/zoo.py by `python tests/zoo.py`: edit there -->"
SECTION_END = "<!-- end of generated section -->"
#: The packages whose declared lower bounds `make test-oldest` installs and tests.
BOUNDED_PACKAGES = ("torch", "transformers", "sentence-transformers", "captum", "shap")


def lower_bounds() -> dict[str, str]:
    """The declared lower bound of each of ``BOUNDED_PACKAGES``, read from pyproject.toml's dependencies."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    found = dict(re.findall(r'^\s*"([A-Za-z0-9_.-]+)>=([^",;]+)"', text, flags=re.MULTILINE))
    return {name: found[name] for name in BOUNDED_PACKAGES}


def docs_section() -> str:
    """The "Tested architectures" section: the zoo's table, the tested versions and the known gaps."""
    ig_settings = ", ".join(f"`{k}={v}`" for k, v in IG_COMPLETENESS_PARAMS.items()) or "their defaults"
    lines = [
        "## Tested architectures and versions",
        "",
        "Every release is tested on tiny random models of these families (2 layers, width 32, built from their",
        "transformers configs) with tokenizers that carry each family's special tokens and released chat template",
        "(`tests/zoo.py`). On each: every method runs; integrated gradients (with "
        f"{ig_settings}) meet a {IG_TOLERANCE:.0%}",
        "completeness tolerance and explain exactly the score of a plain forward pass; the prefix cache and batch",
        "packing change no score, and the additive methods' per-target matrices add up to their sequence scores",
        "(checked in float64, to a bound derived from rounding: `tests/tolerances.py`); model and tokenizer are",
        "left as they were; template tokens are never attributed.",
        "",
        "| Architecture | transformers class | Chat template | What it brings |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {e.name} | `{e.model_class}` | {e.template_source} | {e.traits} |" for e in _ENTRIES]
    lines += [
        "",
        "Oldest versions tested (`make test-oldest` runs the unit tests, the zoo included, at exactly these; CI runs",
        "it after `make test`, which tests the newest releases); older versions are not supported:",
        "",
    ]
    lines += [f"- {name} {version}" for name, version in lower_bounds().items()]
    if KNOWN_GAPS:
        lines += ["", "Known gaps:", ""]
        lines += [f"- {name}: {gap}" for name, gap in KNOWN_GAPS.items()]
    return "\n".join(lines)


def own_model_page(current: str) -> str:
    """``current`` (the page's text) with its generated section replaced by ``docs_section()``, or appended."""
    section = f"{SECTION_BEGIN}\n{docs_section()}\n{SECTION_END}"
    if SECTION_BEGIN in current:
        before, rest = current.split(SECTION_BEGIN, 1)
        return before + section + rest.split(SECTION_END, 1)[1]
    return current.rstrip("\n") + "\n\n" + section + "\n"


if __name__ == "__main__":
    OWN_MODEL_PAGE.write_text(own_model_page(OWN_MODEL_PAGE.read_text(encoding="utf-8")), encoding="utf-8")
