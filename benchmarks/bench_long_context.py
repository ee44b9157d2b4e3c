"""Long documents: which sentences of a 1.3k / 4k-token context did the answer come from, and at what cost.

The document is the GNU GPL v3 shipped inside numpy's wheel (its licence file bundles it): paragraphs taken
backwards from the warranty disclaimer (sections 15-17) until the document reaches the wanted length, given as the
system message; the user asks "Does the program come with a warranty?" and the explained answer is the embedded
model's own (greedy, 30 tokens). Features are the document's sentences (``attribute_messages=[0]``: the question is
context). Each method runs in its own subprocess, so peak RSS is per method (the model's weights included).

Columns: wall time, forward/backward passes, rows scored, tokens processed, peak RSS, and faithfulness on the
sentence ranking: comprehensiveness (score drop when the top 5/10/20% sentences are masked: higher is better) and
sufficiency (score drop when only they are kept: lower is better), in log-prob units, averaged over the fractions;
the context metrics of ContextCite and AT2: ``top-k drop`` (the drop when the k top sentences are removed, k = 1, 3,
5: higher is better) and ``LDS`` (Spearman correlation between the scores' sums over the kept sentences and the
actual score of 32 seeded random half-ablations, sentences removed: higher is better). Every method's result is saved
and all of them are evaluated together in one process after the methods ran (``faithfulness`` over one batch: the
ablations of the LDS, the same for every method, are scored once).
``occlusion (no row reuse)`` is occlusion with per-row prefix reuse turned off, the baseline its speed-up is
measured against in the same run. ``integrated_gradients`` runs at its defaults (adaptive steps, ``checkpoint=None``:
checkpointed by itself where one row's backward pass is over the call budget; the ``checkpoint`` column says whether
it was; on a long document its adaptive rule may take up to 1,024 steps), ``integrated_gradients (64 steps)`` the
defaults' first round alone (64 nodes, requests and checkpointing as at the defaults); ``integrated_gradients (16
steps)`` runs 16 steps with ``checkpoint=False`` (every layer's activations kept for the backward pass),
``integrated_gradients (checkpoint)`` the same 16 steps with ``checkpoint=True`` (layers recompute their activations
in the backward pass instead of keeping them).
``attention`` is the attention from the answer's tokens to each sentence, averaged over heads and layers (one
forward pass); ``at2`` weighs the heads with AT2 weights learnt by ``train_at2`` on six other excerpts of the GPL
terms (from its start; the ``train_at2`` row is that training, done once and kept in ``AT2_WEIGHTS``, which later runs
reuse: delete the file to train again; ``shrinkage``: how far cross-validation mixed the fit with uniform weights). ``(hierarchical)`` rows run the method with
``hierarchical=True`` (paragraphs first, then the sentences of the kept ones; ``pruned``: sentences never searched).

``context-cite (MadryLab)`` is the reference implementation (PyPI ``context-cite``, its defaults: 64 ablations, one
row per call, every row computed whole) on the same model, prompt (the same chat messages) and sentences (a
partitioner of this library's sentence features), its ablated contexts re-rendered without the ablated sentences.
It is not a dependency: install it with ``pip install --no-deps --target DIR context-cite==0.0.4 nltk`` and pass
``--context-cite DIR``. Its modules import spaCy, which only splits responses into words (not called here), so a
stub stands in for it; nltk cannot fetch its sentence model offline and is not needed with this partitioner.

Run: ``python benchmarks/bench_long_context.py [--documents 1300 4000] [--methods occlusion lime ...]``; with
``--keep DIR`` each method's result stays in ``DIR/<tokens>``, and ``--evaluate DIR/<tokens>`` evaluates them again.
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
    "attention": {},
    "at2": {},
    "occlusion": {},
    "occlusion (no row reuse)": {},
    "occlusion (hierarchical)": {"hierarchical": True},
    "lime": {},
    "lime (hierarchical)": {"hierarchical": True},
    "context_cite": {},
    "context_cite (hierarchical)": {"hierarchical": True},
    "context-cite (MadryLab)": {},
    "integrated_gradients": {},
    "integrated_gradients (64 steps)": {"n_steps": 64},
    "integrated_gradients (16 steps)": {"n_steps": 16},
    "integrated_gradients (checkpoint)": {"n_steps": 16},
}
# AttributionExplainer(checkpoint=...) per method; the others leave it at its default (None: automatic)
CHECKPOINT = {"integrated_gradients (16 steps)": False, "integrated_gradients (checkpoint)": True}
MADRYLAB = "context-cite (MadryLab)"
TRAIN_AT2 = "train_at2"
AT2_WEIGHTS = Path(__file__).resolve().parent / "results" / "at2_smollm2.json"
TRAINING_QUESTIONS = ("What does this section say?", "Who may convey the program?", "What must a licensee do?")
TOP_K = (1, 3, 5)
N_ABLATIONS = 32


def gpl_paragraphs() -> list[str]:
    """The paragraphs of the GPL v3's terms in numpy's licence file, re-flowed (the file wraps lines at 72 columns; a
    line end would otherwise end a sentence). Section titles ("15. Disclaimer of Warranty.") are paragraphs too."""
    files = importlib.metadata.files("numpy") or []
    licence = next(f for f in files if f.name == "LICENSE.txt" and "licenses" in str(f))
    text = Path(licence.locate()).read_text(encoding="utf-8")
    terms = text[text.index("TERMS AND CONDITIONS") + len("TERMS AND CONDITIONS") : text.index("END OF TERMS")]
    paragraphs = (" ".join(line.strip() for line in block.splitlines()) for block in terms.split("\n\n"))
    return [paragraph for paragraph in paragraphs if paragraph]


def training_documents(paragraphs: list[str]) -> list[dict[str, Any]]:
    """Six excerpts of six GPL paragraphs from the start of the terms (the long documents are cut from the end)."""
    return [{"messages": [{"role": "system", "content": "\n\n".join(paragraphs[6 * i : 6 * i + 6])},
                          {"role": "user", "content": TRAINING_QUESTIONS[i % len(TRAINING_QUESTIONS)]}]}
            for i in range(6)]


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


def evaluate(folder: str, threads: int) -> dict[str, dict[str, float]]:
    """Every result saved in ``folder`` (one per method, the same document and answer), evaluated in one batch: the
    curve metrics (as ``faithfulness``) and the context metrics (sentences removed), keyed by method."""
    import torch

    from fair_forge.explainability import AttributionBatchResult, AttributionExplainer, AttributionResult
    from fair_forge.explainability import faithfulness as measure
    from fair_forge.explainability import load_default_model

    torch.set_num_threads(threads)
    model, tokenizer = load_default_model()
    explainer = AttributionExplainer(model, tokenizer)
    files = [json.loads(path.read_text()) for path in sorted(Path(folder).glob("*.json"))]
    saved = {entry["method"]: AttributionResult.model_validate_json(entry["result"]) for entry in files}
    batch = AttributionBatchResult(results=list(saved.values()), indices=list(range(len(saved))))
    curves = measure(explainer, batch, fractions=FRACTIONS, curve_points=2, mode="replace", n_random=0)
    context = measure(explainer, batch, metrics=("top_k_drop", "lds"), top_k=TOP_K, n_ablations=N_ABLATIONS,
                      n_random=0)
    return {method: {"comprehensiveness": round(curve.comprehensiveness, 3),
                     "sufficiency": round(curve.sufficiency, 3),
                     **{f"top-{k} drop": round(drop, 3) for k, drop in report.top_k_drop.items()},
                     "LDS": round(report.lds, 3)}
            for method, curve, report in zip(saved, curves.reports, context.reports)}


def train(threads: int) -> dict[str, Any]:
    """AT2's head weights for the embedded model, trained on ``training_documents`` (or read from ``AT2_WEIGHTS``,
    when a run made them already: then ``time s`` is the read)."""
    import torch

    from fair_forge.explainability import AttributionExplainer, At2Weights, load_default_model, train_at2
    from run_all import peak_rss_bytes

    torch.set_num_threads(threads)
    model, tokenizer = load_default_model()
    before = At2Weights.load(AT2_WEIGHTS).info.get("training_key") if AT2_WEIGHTS.exists() else None
    AT2_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    weights = train_at2(AttributionExplainer(model, tokenizer), None, training_documents(gpl_paragraphs()),
                        attribute_messages=[0], path=AT2_WEIGHTS)
    return {"method": TRAIN_AT2, "document tokens": "6 excerpts", "time s": round(time.perf_counter() - started, 1),
            "forward": weights.info.get("n_forward_passes"), "reused": before == weights.info["training_key"],
            "correlation": round(weights.info["correlation"], 3), "shrinkage": weights.info["shrinkage"],
            "peak RSS GB": round(peak_rss_bytes() / 2**30, 2)}


def madrylab(model: Any, tokenizer: Any, messages: list[dict[str, str]], features: list[Any], package: str
             ) -> tuple[list[float], dict[str, Any]]:
    """MadryLab's ContextCiter on ``messages`` (the document is message 0, split into ``features``): its scores per
    sentence and what its attribution cost (forward passes and tokens counted by a hook on the model)."""
    import types

    import numpy as np

    sys.path.insert(0, package)
    spacy, english = types.ModuleType("spacy"), types.ModuleType("spacy.lang.en")
    english.English = None  # used to split a response into words only
    spacy.Language = type("Language", (), {})  # what `datasets` looks for in a loaded spaCy
    sys.modules.update({"spacy": spacy, "spacy.lang": types.ModuleType("spacy.lang"), "spacy.lang.en": english})
    from context_cite import ContextCiter
    from context_cite.context_partitioner import BaseContextPartitioner

    context = messages[0]["content"]

    class Sentences(BaseContextPartitioner):
        """The document's sentences as this library segments them, each with the text before it."""

        def __init__(self) -> None:
            super().__init__(context)
            self.parts = [context[f.start : f.end] for f in features]
            self.separators = [context[before.end if before else 0 : f.start]
                               for before, f in zip([None, *features[:-1]], features)]

        num_sources = property(lambda self: len(self.parts))

        def split_context(self) -> None:
            """Split in ``__init__``."""

        def get_source(self, index: int) -> str:
            return self.parts[index]

        def get_context(self, mask: Any = None) -> str:
            kept = np.ones(len(self.parts), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
            chosen = [(sep, part) for sep, part, keep in zip(self.separators, self.parts, kept) if keep]
            return "".join((sep if index else "") + part for index, (sep, part) in enumerate(chosen))

    class SameChat(ContextCiter):
        """ContextCiter with this benchmark's chat messages (the document as the system message) as its prompt."""

        def _get_prompt_ids(self, mask: Any = None, return_prompt: bool = False) -> Any:
            chat = [{"role": "system", "content": self.partitioner.get_context(mask)}, *messages[1:]]
            prompt = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            return (ids, prompt) if return_prompt else ids

    citer = SameChat(model, tokenizer, context, messages[1]["content"], partitioner=Sentences(),
                     generate_kwargs={"max_new_tokens": ANSWER_TOKENS, "do_sample": False})
    response = citer.response  # generated first, not timed
    counted = {"forward": 0, "tokens": 0}

    def count(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        counted["forward"] += 1
        counted["tokens"] += int(kwargs["input_ids"].numel())

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    started = time.perf_counter()
    try:
        scores = citer.get_attributions(verbose=False)
    finally:
        hook.remove()
    cost = {"time s": round(time.perf_counter() - started, 1), "forward": counted["forward"], "backward": 0,
            "rows": citer.num_ablations, "tokens": counted["tokens"], "response": response[:40]}
    return [float(score) for score in scores], cost


def worker(tokens: int, method: str, answer: str, threads: int, package: Optional[str] = None,
           save: Optional[str] = None) -> dict[str, Any]:
    """One method on one document, in this process (the parent starts one process per method); its result is saved
    into the folder ``save`` for ``evaluate``."""
    import torch

    from fair_forge.explainability import AttributionExplainer, load_default_model
    from fair_forge.explainability.runtime import packer
    from run_all import peak_rss_bytes

    torch.set_num_threads(threads)
    model, tokenizer = load_default_model()
    messages = [{"role": "system", "content": document(tokenizer, tokens)}, {"role": "user", "content": QUESTION}]
    name = method.split(" ")[0]
    if method == "occlusion (no row reuse)":
        packer.ROW_REUSE_MIN_WIDTH = sys.maxsize
    options = {"checkpoint": CHECKPOINT[method]} if method in CHECKPOINT else {}
    explainer = AttributionExplainer(model, tokenizer, **options)
    kwargs = {"granularity": "sentence", "attribute_messages": [0], "show_progress": False}
    extra: dict[str, Any] = {}
    if method == "at2":
        from fair_forge.explainability import At2Weights

        kwargs["weights"] = At2Weights.load(AT2_WEIGHTS)
    if method == MADRYLAB:  # its scores, given to this library's result for the faithfulness columns
        import numpy as np

        from fair_forge.explainability import Granularity, RawAttribution, register_method
        from fair_forge.explainability.text.prompt import build_model_input
        from fair_forge.explainability.text.segment import build_features, restrict_to_messages

        model_input = restrict_to_messages(build_model_input(tokenizer, target=answer, messages=messages), (0,))
        features = build_features(model_input, Granularity.SENTENCE)
        scores, extra = madrylab(model, tokenizer, messages, features, package)
        register_method("given_scores", kind="perturbation", additive=False)(
            lambda context: RawAttribution(np.asarray(scores)))
        name = "given_scores"
    started = time.perf_counter()
    result = explainer.explain(messages, answer, method=name, **kwargs, **METHODS[method])
    seconds = time.perf_counter() - started
    metadata = result.metadata
    searched = getattr(metadata, "hierarchical", None)
    if save is not None:
        (Path(save) / f"{list(METHODS).index(method):02d}.json").write_text(json.dumps({"method": method,
                                                                         "result": result.model_dump_json()}))
    return {
        "document tokens": int(len(tokenizer(messages[0]["content"])["input_ids"])),
        "sentences": len(result.attributions),
        "method": method,
        "time s": round(seconds, 1),
        "forward": metadata.n_forward_passes,
        "backward": metadata.n_backward_passes,
        "rows": getattr(metadata, "n_evaluations", None) or metadata.method_params.get("n_steps"),
        "tokens": metadata.n_tokens_processed,
        "pruned": len(searched["pruned_features"]) if searched else None,
        **extra,
        "peak RSS GB": round(peak_rss_bytes() / 2**30, 2),
        "checkpoint": bool(getattr(metadata, "checkpoint", False)),
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
         threads: int = THREADS, package: Optional[str] = None, keep: Optional[str] = None) -> dict[str, Any]:
    """The table's rows; ``keep``: a folder that keeps each document's saved results (``keep/<tokens>``) for a later
    ``--evaluate`` (by default they go to a temporary folder)."""
    import contextlib
    import tempfile

    chosen = list(methods or METHODS)
    environment = {**os.environ, "TQDM_DISABLE": "1"}

    def run(*arguments: str) -> Any:
        done = subprocess.run([sys.executable, __file__, *arguments, "--threads", str(threads)], capture_output=True,
                              text=True, env=environment)
        if done.returncode != 0:
            raise RuntimeError(f"{arguments[:2]} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    rows: list[dict[str, Any]] = [run("--train")] if "at2" in chosen else []
    for tokens, answer in answers(document_tokens).items():
        if keep is not None:
            (Path(keep) / str(tokens)).mkdir(parents=True, exist_ok=True)
        kept = contextlib.nullcontext(str(Path(keep) / str(tokens))) if keep is not None else None
        with kept or tempfile.TemporaryDirectory() as folder:
            document_rows = []
            for method in chosen:
                if method == MADRYLAB and package is None:
                    rows.append({"method": method, "skipped": "not installed: pass --context-cite DIR"})
                    continue
                extra = ["--context-cite", package] if method == MADRYLAB else []
                document_rows.append({"answer": answer[:40], **run("--worker", str(tokens), method, answer,
                                                                    "--save", folder, *extra)})
            metrics = run("--evaluate", folder) if document_rows else {}
            rows += [{**row, **metrics.get(row["method"], {})} for row in document_rows]
    by_key = {(row["document tokens"], row["method"]): row for row in rows if "skipped" not in row}
    for (doc, method), row in by_key.items():  # speed-ups against the baseline measured in the same run
        baseline = by_key.get((doc, "occlusion (no row reuse)" if method == "occlusion" else method.split(" ")[0]))
        if baseline is not None and (method == "occlusion" or method.endswith("(hierarchical)")):
            row["speed-up"] = round(baseline["time s"] / row["time s"], 2)
            row["rows vs baseline"] = round(row["rows"] / baseline["rows"], 2)
            row["tokens vs baseline"] = round(row["tokens"] / baseline["tokens"], 2)
        reference = by_key.get((doc, "context_cite"))
        if reference is not None and method in ("attention", "at2", "context_cite (hierarchical)", MADRYLAB):
            row["time vs context_cite"] = round(row["time s"] / reference["time s"], 3)
            for metric in ("top-3 drop", "LDS"):
                if reference.get(metric) and metric in row:
                    row[f"{metric} vs context_cite"] = round(row[metric] / reference[metric], 2)
    return {"rows": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("TOKENS", "METHOD", "ANSWER"))
    parser.add_argument("--save", metavar="DIR", help="with --worker: the folder its result is saved into")
    parser.add_argument("--evaluate", metavar="DIR", help="evaluate the results saved in DIR together")
    parser.add_argument("--train", action="store_true", help="train (or read) the AT2 weights")
    parser.add_argument("--documents", nargs="+", type=int, default=list(DOCUMENT_TOKENS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--context-cite", metavar="DIR", help="folder holding the context-cite package (see above)")
    parser.add_argument("--keep", metavar="DIR", help="keep the saved results in DIR/<tokens> (see main)")
    arguments = parser.parse_args()
    if arguments.worker:
        tokens, method, answer = arguments.worker
        print(json.dumps(worker(int(tokens), method, answer, arguments.threads, arguments.context_cite,
                                arguments.save)))
    elif arguments.evaluate:
        print(json.dumps(evaluate(arguments.evaluate, arguments.threads)))
    elif arguments.train:
        print(json.dumps(train(arguments.threads)))
    else:
        from run_all import format_rows

        rows = main(arguments.documents, arguments.methods, arguments.threads, arguments.context_cite,
                    arguments.keep)["rows"]
        print(format_rows(rows))
