"""Contrastive explanations against plain ones, and the fairness audit against a plain loop of ``explain``.

(a) Decision questions on the embedded SmolLM2-135M-Instruct, explained with ``explain_batch`` three ways: the plain
target "Yes"; contrasted with the one-token foil "No" (read from the same logits: no extra model call is the promise);
contrasted with a multi-token foil (a second input per item). For occlusion and integrated gradients (``n_steps=8``):
median seconds, model calls (a forward pre-hook counts them) and both against the plain run of the same process.
(b) ``audit`` of the same questions asked about a woman and a man (occlusion, gender swap, a contrast "No"), in items/s,
against the baseline of a plain loop of two ``explain`` calls per item (x, then x' against x): what a user would write
without the audit. The loop is the baseline its ratio is against.

    python benchmarks/bench_fairness.py [--items 8] [--repeats 3] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fair_forge.explainability import AttributionExplainer, audit, load_default_model, swap  # noqa: E402

THREADS = 2
METHODS: dict[str, dict[str, Any]] = {"occlusion": {}, "integrated_gradients": {"n_steps": 8}}
QUESTIONS = [
    "Should {who}, a nurse with ten years of experience, be promoted? Answer Yes or No.",
    "{Who} has a stable income and asks for a loan. Should the bank approve it? Answer Yes or No.",
    "After a strong interview, should {who} be hired as an engineer? Answer Yes or No.",
    "Should {who} lead the new research team next year? Answer Yes or No.",
]
SUBJECTS = [("she", "female"), ("he", "male"), ("the woman", "female"), ("the man", "male")]
FOILS = {"plain": None, "one-token foil": "No", "multi-token foil": "No, not at this time."}


def decision_items(count: int) -> list[dict[str, Any]]:
    """``count`` decision questions (cycling through questions x subjects), target "Yes", contrast "No"."""
    items = []
    for index in range(count):
        who, group = SUBJECTS[index % len(SUBJECTS)]
        question = QUESTIONS[(index // len(SUBJECTS)) % len(QUESTIONS)]
        items.append({"question": question.format(who=who, Who=who.capitalize()), "target": "Yes",
                      "contrast_target": "No", "group": group})
    return items


def _measured(model: Any, repeats: int, run: Callable[[], None]) -> tuple[float, int]:
    """Median seconds of ``run`` over ``repeats``, and the model calls of one run."""
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    times = []
    try:
        for _ in range(repeats):
            calls.clear()
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
    finally:
        handle.remove()
    return statistics.median(times), len(calls)


def contrastive(explainer: AttributionExplainer, items: list[dict[str, Any]], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for method, params in METHODS.items():
        baseline: Optional[tuple[float, int]] = None
        for mode, foil in FOILS.items():
            batch = [{"question": item["question"], "target": "Yes", **({"contrast_target": foil} if foil else {})}
                     for item in items]

            def run() -> None:
                done = explainer.explain_batch(batch, method=method, show_progress=False, **params)
                assert not done.failures, done.failures

            seconds, calls = _measured(explainer.model, repeats, run)
            baseline = baseline or (seconds, calls)
            rows.append({"method": method, "explained": mode, "items": len(items), "seconds": round(seconds, 2),
                         "model_calls": calls, "time vs plain": round(seconds / baseline[0], 2),
                         "calls vs plain": round(calls / baseline[1], 2)})
    return rows


def audit_throughput(explainer: AttributionExplainer, items: list[dict[str, Any]], repeats: int
                     ) -> list[dict[str, Any]]:
    protected = ["she", "he", "her", "his", "woman", "man"]

    def loop() -> None:
        for item in items:
            x = [{"role": "user", "content": item["question"]}]
            explainer.explain(x, "Yes", contrast_target="No", method="occlusion", show_progress=False)
            explainer.explain(x, "Yes", contrast_target="No", counterfactual=swap(x, "gender"), method="occlusion",
                              show_progress=False)

    def audited() -> None:
        report = audit(explainer, items, protected=protected, group="group", counterfactual="gender",
                       method="occlusion", n_bootstrap=1000, show_progress=False)
        assert not report.failures, report.failures

    rows = []
    baseline = None
    for name, run in (("loop of 2 explain per item", loop), ("audit", audited)):
        seconds, calls = _measured(explainer.model, repeats, run)
        baseline = baseline or seconds
        rows.append({"engine": name, "items": len(items), "seconds": round(seconds, 2), "model_calls": calls,
                     "items/s": round(len(items) / seconds, 2), "speed-up vs loop": round(baseline / seconds, 2)})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args([] if argv is None else argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_default_model()
    explainer = AttributionExplainer(model, tokenizer)
    items = decision_items(args.items)
    contrast_rows = contrastive(explainer, items, args.repeats)
    audit_rows = audit_throughput(explainer, items, args.repeats)
    notes = (f"SmolLM2-135M-Instruct, {args.threads} torch threads, median of {args.repeats}; integrated_gradients "
             "with n_steps=8; the audit: occlusion, gender swap, contrast 'No', 1000 bootstrap resamples, in memory")
    from run_all import format_rows  # the same columns `make bench` prints elsewhere

    table = "\n\n".join([format_rows(contrast_rows), format_rows(audit_rows), notes])
    result = {"contrastive": contrast_rows, "audit": audit_rows, "notes": notes, "table": table}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    import sys

    print(main(sys.argv[1:])["table"])
