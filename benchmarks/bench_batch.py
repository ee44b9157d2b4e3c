"""explain_batch against a plain loop of explain, and integrated gradients' memory on a 262k-token vocabulary.

For occlusion, LIME, KernelSHAP and integrated gradients over Q&A items on the embedded SmolLM2: median seconds of
a plain loop of ``explain`` and of one ``explain_batch`` (and their ratio, loop / batch: > 1 means the batch is
faster), the model calls each made (a forward pre-hook counts them), and the peak RSS of the process. Then
integrated gradients on a tiny random Llama with a 262,144-token vocabulary at two ``n_steps``: peak RSS against
the model's own size (the promise: within 1 GB of it, and flat in ``n_steps``).

Every configuration runs in its own subprocess, so its peak RSS (``run_all.peak_rss_bytes``, the process's
high-water mark) is its own and not the previous configuration's.

    python benchmarks/bench_batch.py                 # 16 items, 3 repeats
    python benchmarks/bench_batch.py --items 4 --repeats 1 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

THREADS = 2
QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters the most."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is photosynthesis?", "Photosynthesis is how plants turn light, water and carbon dioxide into sugar."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("How do bees make honey?", "Bees turn flower nectar into honey by evaporating its water in the hive."),
    ("What language is spoken in Brazil?", "Portuguese is spoken in Brazil."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("Why do we have seasons?", "The tilt of the Earth's axis changes how directly sunlight reaches us."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest."),
    ("What gas do humans breathe out?", "Humans breathe out carbon dioxide."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 degrees Fahrenheit."),
]
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer in one sentence."}
METHODS: dict[str, dict[str, Any]] = {
    "occlusion": {},
    "lime": {"n_samples": 64},
    "kernel_shap": {"n_samples": 64},
    "integrated_gradients": {},
}
BIG_VOCAB = 262_144


def items(count: int) -> tuple[list[list[dict[str, str]]], list[str]]:
    """(conversations, answers) of ``count`` items (cycling through QA), every other one with a system prompt."""
    chosen = [QA[index % len(QA)] for index in range(count)]
    return [([SYSTEM] if index % 2 else []) + [{"role": "user", "content": question}]
            for index, (question, _) in enumerate(chosen)], [answer for _, answer in chosen]


def _peak_rss_mb() -> float:
    from run_all import peak_rss_bytes

    return peak_rss_bytes() / 2**20


def _count_calls(model: Any) -> tuple[list[int], Any]:
    calls: list[int] = []
    return calls, model.register_forward_pre_hook(lambda *args: calls.append(1))


def run_comparison(method: str, mode: str, n_items: int, repeats: int) -> dict[str, Any]:
    """One configuration in this process: median seconds, model calls of one run, peak RSS."""
    import torch

    from fair_forge.explainability import AttributionExplainer, load_default_model

    torch.set_num_threads(THREADS)
    model, tokenizer = load_default_model()
    explainer = AttributionExplainer(model, tokenizer)
    conversations, answers = items(n_items)
    params = METHODS[method]

    def once() -> None:
        if mode == "loop":
            for messages, answer in zip(conversations, answers):
                explainer.explain(messages, answer, method=method, **params)
        else:
            batch = explainer.explain_batch(list(zip(conversations, answers)), method=method, show_progress=False,
                                            **params)
            assert not batch.failures, batch.failures

    calls, handle = _count_calls(model)
    times = []
    for _ in range(repeats):
        calls.clear()
        started = time.perf_counter()
        once()
        times.append(time.perf_counter() - started)
    handle.remove()
    return {"seconds": statistics.median(times), "model_calls": len(calls), "peak_rss_mb": _peak_rss_mb()}


def run_big_vocab(n_steps: int) -> dict[str, Any]:
    """Integrated gradients on a tiny random Llama with a 262k vocabulary: peak RSS and the model's size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fair_forge.explainability import AttributionExplainer, load_default_model

    torch.set_num_threads(THREADS)
    _, tokenizer = load_default_model()  # its ids (< 49152) are valid in the larger vocabulary
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=BIG_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    before = _peak_rss_mb()
    conversations, answers = items(1)
    AttributionExplainer(model, tokenizer).explain(conversations[0], answers[0], method="integrated_gradients",
                                                   n_steps=n_steps)
    return {"model_mb": size_mb, "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": before}


def _child(arguments: list[str]) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter and read its JSON answer."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--child", *arguments], capture_output=True, text=True,
                          env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench_batch child {arguments} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=sorted(METHODS))
    parser.add_argument("--steps", nargs=2, type=int, default=[64, 512], help="n_steps of the big-vocabulary runs")
    parser.add_argument("--child", nargs="*")
    args = parser.parse_args(argv)
    if args.child is not None:  # one configuration, printed as JSON
        kind, *rest = args.child
        answer = run_big_vocab(int(rest[0])) if kind == "vocab" else run_comparison(kind, rest[0], int(rest[1]),
                                                                                      int(rest[2]))
        print(json.dumps(answer))
        return answer
    rows = []
    for method in args.methods:
        loop = _child([method, "loop", str(args.items), str(args.repeats)])
        batch = _child([method, "batch", str(args.items), str(args.repeats)])
        rows.append({
            "method": method, "items": args.items, "loop_s": loop["seconds"], "batch_s": batch["seconds"],
            "ratio": loop["seconds"] / batch["seconds"], "loop_calls": loop["model_calls"],
            "batch_calls": batch["model_calls"], "loop_rss_mb": loop["peak_rss_mb"],
            "batch_rss_mb": batch["peak_rss_mb"],
        })
    for n_steps in args.steps:
        vocab = _child(["vocab", str(n_steps)])
        rows.append({"method": f"integrated_gradients, vocab {BIG_VOCAB}, n_steps={n_steps}", "items": 1,
                     "batch_rss_mb": vocab["peak_rss_mb"], "model_mb": vocab["model_mb"],
                     "rss_over_model_mb": vocab["peak_rss_mb"] - vocab["model_mb"]})
    return {"rows": rows}


if __name__ == "__main__":
    result = main()
    if "rows" in result:
        from run_all import format_rows  # noqa: E402  (run as a script from benchmarks/)

        print(format_rows(result["rows"]))
