"""Which method's ranking does the model follow? ``compare_methods`` over every LM method on a small Q&A set.

The answers are the embedded model's own (greedy generation through the chat template, end-of-turn token
stripped, cut after the first sentence), so every explanation explains something the model actually says. Word
granularity, ``mode="remove"``, the default fractions (0.1 ... 0.5), 6 curve points and 3 random orders per item;
the methods cheapest first, the sampled ones with the small sample counts of ``METHOD_PARAMS`` (sized for a shared
2-core CPU). ``--answers FILE`` keeps the generated Q&A set in FILE and reuses it on the next run. Prints (and returns) the
method-comparison table as markdown, ordered by comprehensiveness; ``docs/choosing-a-method.md`` shows its output.
Run: ``python benchmarks/bench_faithfulness.py [--threads 2] [--items 12] [--methods a,b] [--answers F] [--json out]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fair_forge.explainability import AttributionExplainer, available_methods, compare_methods  # noqa: E402
from fair_forge.explainability.runtime.models import load_default_model  # noqa: E402

THREADS = 2
MAX_NEW_TOKENS = 24
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
# cheapest first; small sample counts, so that 11 methods x 12 items fit in well under an hour on a busy 2-core CPU
METHOD_PARAMS: dict[str, dict[str, Any]] = {
    "saliency": {},
    "input_x_gradient": {},
    "occlusion": {},
    "integrated_gradients": {"n_steps": 8},
    "gradient_shap": {"n_samples": 4},
    "smooth_grad": {"n_samples": 4},
    "square_grad": {"n_samples": 4},
    "var_grad": {"n_samples": 4},
    "lime": {"n_samples": 32},
    "kernel_shap": {"n_samples": 32},
    "sobol": {"n_samples": 4},
}
QUESTIONS = [
    "What is the capital of France?",
    "Who wrote the play Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "How many days are there in a week?",
    "What colour do you get when you mix blue and yellow?",
    "What is the chemical symbol for water?",
    "Which animal is known as the king of the jungle?",
    "What is the boiling point of water in Celsius?",
    "Who painted the Mona Lisa?",
    "What language is spoken in Brazil?",
    "How many legs does a spider have?",
    "What is the tallest mountain in the world?",
]
METRIC_FORMATS = {"comprehensiveness": "+.3f", "sufficiency": "+.3f", "deletion_auc": "+.3f",
                  "insertion_auc": "+.3f", "seconds_per_item": ".2f", "passes_per_item": ".1f"}


def generate_answers(model: Any, tokenizer: Any, questions: Sequence[str]) -> list[dict[str, str]]:
    """The model's own greedy answer to each question (chat template, end-of-turn token stripped)."""
    items = []
    for question in questions:
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.no_grad():
            output = model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        answer = tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        items.append({"question": question, "answer": answer})
    return items


def first_sentence(answer: str) -> str:
    """The answer up to its first sentence end (all of it when it has none): shorter targets, same model output."""
    end = SENTENCE_END.search(answer)
    return answer[: end.end()] if end else answer


def load_items(model: Any, tokenizer: Any, count: int, path: Optional[str]) -> list[dict[str, str]]:
    """The Q&A set: generated now, or read from ``path`` when an earlier run wrote it there."""
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            generated = json.load(handle)[:count]
    else:
        generated = generate_answers(model, tokenizer, QUESTIONS[:count])
        if path:
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(generated, handle, indent=1)
    return [{"question": item["question"], "answer": first_sentence(item["answer"])} for item in generated]


def markdown_table(frame: Any) -> str:
    """The comparison as a markdown table, best comprehensiveness first, the random row last."""
    import pandas as pd

    ordered = pd.concat([frame[frame.method != "random"].sort_values("comprehensiveness", ascending=False),
                         frame[frame.method == "random"]])
    header = ["method", *METRIC_FORMATS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in ordered.iterrows():
        cells = [f"`{row['method']}`"] + [
            "" if pd.isna(row[name]) else format(row[name], spec) for name, spec in METRIC_FORMATS.items()
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the comparison and return its table (``argv`` defaults to none, as ``run_all`` calls it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads")
    parser.add_argument("--items", type=int, default=len(QUESTIONS), help="how many of the questions")
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: all LM methods)")
    parser.add_argument("--n-random", type=int, default=3)
    parser.add_argument("--curve-points", type=int, default=6)
    parser.add_argument("--answers", default=None, help="read the Q&A set from this file, or write it there")
    parser.add_argument("--json", default=None, help="also write the rows and the Q&A set to this file")
    args = parser.parse_args(list(argv) if argv is not None else [])
    torch.set_num_threads(args.threads)
    model, tokenizer = load_default_model()
    started = time.perf_counter()
    items = load_items(model, tokenizer, args.items, args.answers)
    print(f"{len(items)} answers ready in {time.perf_counter() - started:.1f} s", flush=True)
    for item in items:
        print(f"  Q: {item['question']}\n  A: {item['answer']}", flush=True)
    import pandas as pd

    others = sorted(set(available_methods()) - set(METHOD_PARAMS))
    methods = args.methods.split(",") if args.methods else [*METHOD_PARAMS, *others]
    explainer = AttributionExplainer(model, tokenizer)
    frames = []
    for position, method in enumerate(methods):  # one method at a time, so progress shows; random orders once
        frame = compare_methods(explainer, items, {method: METHOD_PARAMS.get(method, {})}, granularity="word",
                                curve_points=args.curve_points, n_random=args.n_random if position == 0 else 0)
        print(frame.to_string(header=position == 0, index=False), flush=True)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    table = markdown_table(frame)
    print(table, flush=True)
    result = {"table": table, "rows": frame.to_dict(orient="records"), "items": items, "method_params": METHOD_PARAMS,
              "threads": torch.get_num_threads(), "n_random": args.n_random, "curve_points": args.curve_points}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
