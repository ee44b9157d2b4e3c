"""Long documents: which sentences of a 1.3k / 4k-token context did the answer come from, and at what cost.

The document is the GNU GPL v3 shipped inside numpy's wheel (its licence file bundles it): paragraphs taken
backwards from the warranty disclaimer (sections 15-17) until the document reaches the wanted length, given as the
system message; the user asks "Does the program come with a warranty?" and the explained answer is the embedded
model's own (greedy, 30 tokens). Features are the document's sentences (``attribute_messages=[0]``: the question is
context). Each method runs in its own subprocess, so peak RSS is per method (the model's weights included).

Columns: wall time, forward/backward passes, rows scored, tokens processed, peak RSS, and faithfulness on the
sentence ranking: comprehensiveness (score drop when the top 5/10/20% sentences are masked: higher is better) and
sufficiency (score drop when only they are kept: lower is better), in log-prob units, averaged over the fractions.
``occlusion (no row reuse)`` is occlusion with per-row prefix reuse turned off, the baseline its speed-up is
measured against in the same run. ``integrated_gradients`` runs at its defaults (adaptive steps, ``checkpoint=None``:
checkpointed by itself where one row's backward pass is over the call budget; the ``checkpoint`` column says whether
it was); ``integrated_gradients (16 steps)`` runs 16 steps with ``checkpoint=False`` (every layer's activations kept
for the backward pass), ``integrated_gradients (checkpoint)`` the same 16 steps with ``checkpoint=True`` (layers
recompute their activations in the backward pass instead of keeping them).

Run: ``python benchmarks/bench_long_context.py [--documents 1300 4000] [--methods occlusion lime ...]``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

THREADS = 2
QUESTION = "Does the program come with a warranty?"
ANSWER_TOKENS = 30
FRACTIONS = (0.05, 0.1, 0.2)
DOCUMENT_TOKENS = (1300, 4000)
METHODS: dict[str, dict[str, Any]] = {
    "occlusion": {},
    "occlusion (no row reuse)": {},
    "lime": {},
    "context_cite": {},
    "integrated_gradients": {},
    "integrated_gradients (16 steps)": {"n_steps": 16},
    "integrated_gradients (checkpoint)": {"n_steps": 16},
}
# AttributionExplainer(checkpoint=...) per method; the others leave it at its default (None: automatic)
CHECKPOINT = {"integrated_gradients (16 steps)": False, "integrated_gradients (checkpoint)": True}


def gpl_paragraphs() -> list[str]:
    """The paragraphs of the GPL v3's terms in numpy's licence file, re-flowed (the file wraps lines at 72 columns; a
    line end would otherwise end a sentence). Section titles ("15. Disclaimer of Warranty.") are paragraphs too."""
    files = importlib.metadata.files("numpy") or []
    licence = next(f for f in files if f.name == "LICENSE.txt" and "licenses" in str(f))
    text = Path(licence.locate()).read_text(encoding="utf-8")
    terms = text[text.index("TERMS AND CONDITIONS") + len("TERMS AND CONDITIONS") : text.index("END OF TERMS")]
    paragraphs = (" ".join(line.strip() for line in block.splitlines()) for block in terms.split("\n\n"))
    return [paragraph for paragraph in paragraphs if paragraph]


def document(tokenizer: Any, tokens: int) -> str:
    """GPL paragraphs from the end of the terms (the warranty disclaimer) backwards, in reading order, until about
    ``tokens`` tokens."""
    chosen: list[str] = []
    for paragraph in reversed(gpl_paragraphs()):
        if chosen and len(tokenizer("\n\n".join([paragraph, *chosen]))["input_ids"]) > tokens:
            break
        chosen.insert(0, paragraph)
    return "\n\n".join(chosen)


def own_answer(model: Any, tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The model's greedy answer to ``messages`` (chat template), ``ANSWER_TOKENS`` tokens at most."""
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**ids, max_new_tokens=ANSWER_TOKENS, do_sample=False)
    return tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def faithfulness(explainer: Any, result: Any) -> dict[str, float]:
    """Comprehensiveness and sufficiency of ``result``'s sentence ranking over ``FRACTIONS`` (``evaluation``),
    masked sentences replaced by the pad token as the perturbation methods do; no curves or random orders (each
    edit costs a forward pass over the whole document)."""
    from fair_forge.explainability import faithfulness as evaluate

    report = evaluate(explainer, result, fractions=FRACTIONS, curve_points=2, mode="replace", n_random=0)
    return {"comprehensiveness": report.comprehensiveness, "sufficiency": report.sufficiency}


def worker(tokens: int, method: str, answer: str, threads: int) -> dict[str, Any]:
    """One method on one document, in this process (the parent starts one process per method)."""
    import torch

    from fair_forge.explainability import AttributionExplainer, load_default_model, scoring
    from run_all import peak_rss_bytes

    torch.set_num_threads(threads)
    model, tokenizer = load_default_model()
    messages = [{"role": "system", "content": document(tokenizer, tokens)}, {"role": "user", "content": QUESTION}]
    name = method.split(" ")[0]
    if method == "occlusion (no row reuse)":
        scoring.ROW_REUSE_MIN_WIDTH = sys.maxsize
    options = {"checkpoint": CHECKPOINT[method]} if method in CHECKPOINT else {}
    explainer = AttributionExplainer(model, tokenizer, **options)
    started = time.perf_counter()
    result = explainer.explain(messages, answer, method=name, granularity="sentence", attribute_messages=[0],
                               **METHODS[method])
    seconds = time.perf_counter() - started
    metadata = result.metadata
    return {
        "document tokens": int(len(tokenizer(messages[0]["content"])["input_ids"])),
        "sentences": len(result.attributions),
        "method": method,
        "time s": round(seconds, 1),
        "forward": metadata.n_forward_passes,
        "backward": metadata.n_backward_passes,
        "rows": getattr(metadata, "n_evaluations", None) or metadata.method_params.get("n_steps"),
        "tokens": metadata.n_tokens_processed,
        "peak RSS GB": round(peak_rss_bytes() / 2**30, 2),
        "checkpoint": bool(getattr(metadata, "checkpoint", False)),
        **{key: round(value, 3) for key, value in faithfulness(explainer, result).items()},
        "top sentence": max(result.attributions, key=lambda a: a.score).text[:60],
    }


def answers(document_tokens: Sequence[int]) -> dict[int, str]:
    """The model's own answer for each document (generated once, in this process)."""
    from fair_forge.explainability import load_default_model

    model, tokenizer = load_default_model()
    return {tokens: own_answer(model, tokenizer, [{"role": "system", "content": document(tokenizer, tokens)},
                                                  {"role": "user", "content": QUESTION}])
            for tokens in document_tokens}


def main(document_tokens: Sequence[int] = DOCUMENT_TOKENS, methods: Optional[Sequence[str]] = None,
         threads: int = THREADS) -> dict[str, Any]:
    rows = []
    for tokens, answer in answers(document_tokens).items():
        for method in methods or METHODS:
            command = [sys.executable, __file__, "--worker", str(tokens), method, answer, "--threads", str(threads)]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if done.returncode != 0:
                raise RuntimeError(f"{method} on {tokens} tokens failed:\n{done.stderr[-3000:]}")
            rows.append({"answer": answer[:40], **json.loads(done.stdout.strip().splitlines()[-1])})
    by_key = {(row["document tokens"], row["method"]): row for row in rows}
    for (doc, method), row in by_key.items():
        baseline = by_key.get((doc, "occlusion (no row reuse)"))
        if method == "occlusion" and baseline:
            row["speed-up vs no reuse"] = round(baseline["time s"] / row["time s"], 2)
            row["tokens vs no reuse"] = round(row["tokens"] / baseline["tokens"], 2)
    return {"rows": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("TOKENS", "METHOD", "ANSWER"))
    parser.add_argument("--documents", nargs="+", type=int, default=list(DOCUMENT_TOKENS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=THREADS)
    arguments = parser.parse_args()
    if arguments.worker:
        tokens, method, answer = arguments.worker
        print(json.dumps(worker(int(tokens), method, answer, arguments.threads)))
    else:
        from run_all import format_rows

        print(format_rows(main(arguments.documents, arguments.methods, arguments.threads)["rows"]))
