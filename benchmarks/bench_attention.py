"""Attention and AT2 against occlusion: seconds and model passes per explanation, and the rankings' faithfulness.

Two inputs on the embedded SmolLM2: the demo question (word features), and the 1.3k-token GPL document of
bench_long_context.py (sentence features of the system message, the question kept as context, the model's own answer).
AT2's head weights are trained first (``train_at2``) on other documents cut from the GPL terms (six excerpts of six
paragraphs each, with a question; the model answers), their cost reported on its own row; they are kept in
bench_long_context's ``AT2_WEIGHTS`` file, which both benchmarks reuse once made (``reused``). Each method runs
``--repeats`` times in this one process on 2 threads; the time is the median. Faithfulness (comprehensiveness: higher
is better; sufficiency: lower is better) is measured on the long document, as in bench_long_context.py.

Run: ``python benchmarks/bench_attention.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

THREADS = 2


def timed(explainer: Any, repeats: int, inputs: dict[str, Any], **settings: Any) -> tuple[float, Any]:
    """Median seconds of ``repeats`` explanations, and the last result."""
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = explainer.explain(**inputs, show_progress=False, **settings)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def main(repeats: int = 5) -> list[dict[str, Any]]:
    import torch

    from bench_long_context import (AT2_WEIGHTS, QUESTION, document, faithfulness, gpl_paragraphs, own_answer,
                                    training_documents)
    from fair_forge.explainability import AttributionExplainer, load_default_model, train_at2

    torch.set_num_threads(THREADS)
    model, tokenizer = load_default_model()
    explainer = AttributionExplainer(model, tokenizer)
    started, reused = time.perf_counter(), AT2_WEIGHTS.exists()
    AT2_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    weights = train_at2(explainer, None, training_documents(gpl_paragraphs()), attribute_messages=[0],
                        path=AT2_WEIGHTS)
    rows = [{"input": "training (6 documents)", "method": "train_at2", "reused": reused,
             "time s": round(time.perf_counter() - started, 1), "forward": weights.info["n_forward_passes"],
             "correlation": round(weights.info["correlation"], 3)}]
    long_messages = [{"role": "system", "content": document(tokenizer, 1300)}, {"role": "user", "content": QUESTION}]
    inputs = {
        "demo": ({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                  "target": "The capital of France is Paris."}, {"granularity": "word"}),
        "GPL 1.3k tokens": ({"messages": long_messages, "target": own_answer(model, tokenizer, long_messages)},
                            {"granularity": "sentence", "attribute_messages": [0]}),
    }
    methods = {"attention": {}, "at2": {"weights": weights}, "occlusion": {}}
    for label, (item, settings) in inputs.items():
        times = {}
        for method, params in methods.items():
            seconds, result = timed(explainer, repeats if method != "occlusion" or label == "demo" else 3, item,
                                    method=method, **settings, **params)
            times[method] = seconds
            row = {"input": label, "method": method, "features": len(result.attributions), "time s": round(seconds, 3),
                   "forward": result.metadata.n_forward_passes, "tokens": result.metadata.n_tokens_processed,
                   "top": max(result.attributions, key=lambda a: a.score).text[:40]}
            if label != "demo":
                row.update({key: round(value, 3) for key, value in faithfulness(explainer, result).items()})
            rows.append(row)
        for row in rows[-len(methods):]:
            row["x faster than occlusion"] = round(times["occlusion"] / row["time s"], 1)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    from run_all import format_rows

    print(format_rows(main(parser.parse_args().repeats)))
