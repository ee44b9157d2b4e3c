"""Perturbation methods on the embedded model: wall time, model evaluations, ratio to the bare forward floor, and
interpreto / captum ``LLMAttribution`` side by side with the same number of samples.

The floor is the time the bare model needs for the same number of distinct masked sequences at their full length
(no masking, no attribution, no caching), as many rows per call as the library's sizing gives whole sequences:
what any method that scores those masks must at least pay unless it reuses the unchanged prefix. interpreto gets
the same rows per call. A second table times ``explain_batch`` over 8 Q&A items (their masked inputs packed into
shared model calls) against a loop of ``explain``.
Run: ``python benchmarks/bench_perturbation.py [--threads 1] [--batch-size N] [--json out]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fair_forge.explainability.explainer import AttributionExplainer  # noqa: E402
from fair_forge.explainability.runtime.models import load_default_model  # noqa: E402
from fair_forge.explainability.text.prompt import build_model_input  # noqa: E402
from fair_forge.explainability.runtime.packer import rows_per_call  # noqa: E402
from fair_forge.explainability.runtime.scorer import TargetScorer, contiguous_head_input  # noqa: E402

THREADS = 2  # like bench_gradient; on a busy machine, 1 thread avoids oversubscription stalls
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TARGET = "The capital of France is Paris."
METHODS: dict[str, dict[str, Any]] = {
    "occlusion": {},
    "lime": {"n_samples": 100},
    "kernel_shap": {"n_samples": 100},
    "sobol": {},
}


def _median_time(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def forward_floor(model: Any, input_ids: torch.Tensor, n_target: int, n_sequences: int, batch_size: int,
                  repeats: int) -> float:
    """Median time of bare forward passes over ``n_sequences`` copies of ``input_ids`` in batches of ``batch_size``,
    computing logits only where target tokens are predicted (as any scorer needs), the output layer fed a contiguous
    input as in the scorer."""

    def run() -> None:
        with torch.no_grad(), contiguous_head_input(model):
            for start in range(0, n_sequences, batch_size):
                batch = input_ids.expand(min(batch_size, n_sequences - start), -1)
                model(batch, use_cache=False, logits_to_keep=n_target + 1)

    return _median_time(run, repeats)[0]


def full_length_rows(model: Any, tokenizer: Any, batch_size: Optional[int]) -> int:
    """Rows per call for whole (uncached) sequences: ``batch_size``, or the library's default sizing for them; the
    floor and interpreto get this many."""
    model_input = build_model_input(tokenizer, target=TARGET, messages=MESSAGES)
    vocab_size = TargetScorer(model).vocab_size
    return rows_per_call(model_input.length, model_input.n_target, vocab_size, gradients=False, batch_size=batch_size)


def ours(model: Any, tokenizer: Any, batch_size: Optional[int], repeats: int) -> list[dict[str, Any]]:
    explainer = AttributionExplainer(model, tokenizer, batch_size=batch_size)
    explainer.explain(MESSAGES, TARGET, method="occlusion")  # warm-up (allocator)
    import lime.lime_base, scipy.stats.qmc, shap  # noqa: E401, F401 - imported once, outside the timings
    model_input = build_model_input(tokenizer, target=TARGET, messages=MESSAGES)
    input_ids = model_input.input_ids.unsqueeze(0)
    rows = []
    for method, params in METHODS.items():
        seconds, result = _median_time(lambda: explainer.explain(MESSAGES, TARGET, method=method, **params), repeats)
        meta = result.metadata
        floor = forward_floor(model, input_ids, model_input.n_target, meta.n_evaluations,
                              full_length_rows(model, tokenizer, batch_size), repeats)
        rows.append({
            "library": "fair_forge", "method": method, "params": params, "seconds": seconds,
            "n_features": meta.n_features, "n_evaluations": meta.n_evaluations,
            "n_forward_passes": meta.n_forward_passes, "floor_seconds": floor, "ratio_to_floor": seconds / floor,
        })
    return rows


DATASET = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Who wrote Hamlet?", "Hamlet was written by William Shakespeare."),
    ("What colour is the sky on a clear day?", "The sky is blue."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius."),
    ("Which planet is known as the red planet?", "Mars is known as the red planet."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean."),
]


def batch_rows(model: Any, tokenizer: Any, batch_size: Optional[int], repeats: int) -> list[dict[str, Any]]:
    """``explain_batch`` (items packed into shared model calls) against a loop of ``explain`` over the same items."""
    explainer = AttributionExplainer(model, tokenizer, batch_size=batch_size)
    items = [{"question": question, "answer": answer} for question, answer in DATASET]
    rows = []
    for method in ("occlusion", "lime"):
        params = METHODS[method]
        loop = lambda: [explainer.explain([{"role": "user", "content": q}], a, method=method, **params)  # noqa: E731
                        for q, a in DATASET]
        loop_seconds, _ = _median_time(loop, repeats)
        packed_seconds, _ = _median_time(
            lambda: explainer.explain_batch(items, method=method, show_progress=False, **params), repeats)
        rows.append({"library": "fair_forge", "method": f"{method} x{len(DATASET)} items", "params": params,
                     "loop_seconds": loop_seconds, "seconds": packed_seconds,
                     "packed_speedup": loop_seconds / packed_seconds})
        print(f"{'batch':>10} {rows[-1]['method']:>20}  loop {loop_seconds:6.2f}s  explain_batch "
              f"{packed_seconds:6.2f}s  x{rows[-1]['packed_speedup']:.2f}", flush=True)
    return rows


def interpreto_rows(batch_size: int, repeats: int) -> list[dict[str, Any]]:
    """interpreto adds a token to the tokenizer and resizes the embeddings, so it gets its own copy of the model."""
    import interpreto

    model, tokenizer = load_default_model()
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    rows = []
    for name, cls in (("lime", interpreto.Lime), ("kernel_shap", interpreto.KernelShap)):
        explainer = cls(model, tokenizer, batch_size=batch_size, granularity=interpreto.Granularity.WORD,
                        n_perturbations=METHODS[name]["n_samples"])
        seconds, _ = _median_time(lambda: explainer(prompt, TARGET), repeats)
        rows.append({"library": "interpreto", "method": name, "params": METHODS[name], "seconds": seconds})
    return rows


def captum_rows(model: Any, tokenizer: Any, repeats: int) -> list[dict[str, Any]]:
    from captum.attr import KernelShap, Lime, LLMAttribution, TextTemplateInput

    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    content = MESSAGES[0]["content"]
    words = content.split()
    head, tail = rendered.split(content, 1)
    inp = TextTemplateInput(template=head + " ".join(["{}"] * len(words)) + tail, values=words)
    rows = []
    for name, cls in (("lime", Lime), ("kernel_shap", KernelShap)):
        attribution = LLMAttribution(cls(model), tokenizer)
        n_samples = METHODS[name]["n_samples"]
        seconds, _ = _median_time(lambda: attribution.attribute(inp, target=TARGET, n_samples=n_samples), repeats)
        rows.append({"library": "captum", "method": name, "params": METHODS[name], "seconds": seconds})
    return rows


def _printed(rows: list[dict[str, Any]], mine: dict[str, float]) -> list[dict[str, Any]]:
    """Print rows as they are measured; peers' rows with how much slower they are than ours."""
    for row in rows:
        if row["library"] == "fair_forge":
            extra = (f"  evals {row['n_evaluations']:4d}  passes {row['n_forward_passes']:3d}  "
                     f"floor {row['floor_seconds']:.2f}s  x{row['ratio_to_floor']:.2f} of floor")
        else:
            row["ours_faster_by"] = row["seconds"] / mine[row["method"]]
            extra = f"  ours is {row['ours_faster_by']:.1f}x faster"
        print(f"{row['library']:>10} {row['method']:>12}  {row['seconds']:7.2f}s{extra}", flush=True)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark and return its rows (``argv`` defaults to none, as ``run_all`` calls it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=None, help="rows per call (default: the library's sizing)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-repeats", type=int, default=1, help="captum is slow; one run each by default")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(list(argv) if argv is not None else [])
    torch.set_num_threads(args.threads)
    model, tokenizer = load_default_model()
    peer_rows = full_length_rows(model, tokenizer, args.batch_size)
    print(f"perturbation methods, SmolLM2-135M, WORD, batch {args.batch_size or 'default'} (floor and interpreto: "
          f"{peer_rows} whole sequences), {torch.get_num_threads()} threads")
    rows = _printed(ours(model, tokenizer, args.batch_size, args.repeats), {})
    mine = {row["method"]: row["seconds"] for row in rows}
    rows += batch_rows(model, tokenizer, args.batch_size, args.repeats)
    if not args.no_peers:
        rows += _printed(interpreto_rows(peer_rows, args.peer_repeats), mine)
        rows += _printed(captum_rows(model, tokenizer, args.peer_repeats), mine)
    result = {"rows": rows, "threads": torch.get_num_threads(), "batch_size": args.batch_size}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
