"""Whole datasets: items/s of ``explain_dataset`` against a plain loop of ``explain``, Ray with 2 workers against the
local engine, and peak RSS at two dataset sizes (memory must stay flat in the number of items).

Throughput: a Q&A dataset of ``--items`` (default 64) chat items on the embedded SmolLM2-135M-Instruct, occlusion and
integrated gradients (``n_steps=8``: a fixed, small quadrature, the same for every engine), written to a Parquet
output. The loop of ``explain`` is the baseline every ratio is against; on 2 cores Ray is not expected to gain (each
actor gets one core and its own copy of the model): the row is there for machines with more.
Memory: a fresh process per size explains N items with occlusion on a tiny 2-layer Llama (the embedded tokenizer)
into Parquet and reports its peak RSS; the difference between the sizes is what grows with the dataset.
Run: ``python benchmarks/bench_dataset.py [--items 64] [--sizes 100 2000] [--no-ray] [--json out]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fair_forge.explainability import AttributionExplainer, explain_dataset, load_default_model  # noqa: E402
from fair_forge.explainability.runtime.models import default_model_path  # noqa: E402

THREADS = 2
METHODS: dict[str, dict[str, Any]] = {"occlusion": {}, "integrated_gradients": {"n_steps": 8}}
PLACES = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
          ("Egypt", "Cairo"), ("Peru", "Lima"), ("Canada", "Ottawa")]
TEMPLATES = [("What is the capital of {country}?", "The capital of {country} is {city}."),
             ("Which city is the capital of {country}?", "{city} is the capital of {country}."),
             ("Name the capital city of {country}, please.", "It is {city}."),
             ("In one sentence: where does the government of {country} sit?", "It sits in {city}, the capital.")]


def qa_items(count: int) -> list[dict[str, str]]:
    """``count`` distinct-enough Q&A chat items (questions of several lengths)."""
    items = []
    for index in range(count):
        country, city = PLACES[index % len(PLACES)]
        question, answer = TEMPLATES[(index // len(PLACES)) % len(TEMPLATES)]
        items.append({"question": question.format(country=country),
                      "answer": answer.format(country=country, city=city)})
    return items


def _items_per_second(count: int, seconds: float) -> float:
    return round(count / seconds, 2)


def throughput(items: list[dict[str, str]], ray_workers: int) -> list[dict[str, Any]]:
    model, tokenizer = load_default_model()
    explainer = AttributionExplainer(model, tokenizer)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for method, params in METHODS.items():
            started = time.perf_counter()
            for item in items:
                explainer.explain([{"role": "user", "content": item["question"]}], item["answer"], method=method,
                                  **params)
            loop = time.perf_counter() - started
            timings = {"loop of explain": loop}
            started = time.perf_counter()
            explain_dataset(explainer, items, Path(folder) / f"{method}.parquet", method=method, show_progress=False,
                            **params)
            timings["explain_dataset local"] = time.perf_counter() - started
            if ray_workers:
                started = time.perf_counter()
                explain_dataset(explainer, items, Path(folder) / f"{method}-ray.parquet", method=method,
                                show_progress=False, engine="ray", num_workers=ray_workers,
                                model_loader=str(default_model_path()), **params)
                timings[f"explain_dataset ray x{ray_workers}"] = time.perf_counter() - started
            for engine, seconds in timings.items():
                rows.append({"method": method, "engine": engine, "items": len(items), "seconds": round(seconds, 2),
                             "items/s": _items_per_second(len(items), seconds), "vs loop": round(loop / seconds, 2)})
    return rows


def _rss_child(count: int) -> None:
    """In a fresh process: explain ``count`` items on a tiny model into Parquet, print the peak RSS in MB."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    explainer = AttributionExplainer(LlamaForCausalLM(config).eval(), tokenizer)
    with tempfile.TemporaryDirectory() as folder:
        items = (item for item in qa_items(count))  # lazily: the source is not held either
        explain_dataset(explainer, items, Path(folder) / "out.parquet", method="occlusion", show_progress=False)
    from run_all import peak_rss_bytes

    print(json.dumps({"peak_rss_mb": peak_rss_bytes() / 2**20}))


def peak_rss(sizes: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    for count in sizes:
        started = time.perf_counter()
        output = subprocess.run([sys.executable, __file__, "--rss-child", str(count)], capture_output=True,
                                text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        peak = json.loads(output.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        rows.append({"items": count, "peak_rss_mb": round(peak, 1), "seconds": round(time.perf_counter() - started, 1)})
    for row in rows:
        row["vs smallest (MB)"] = round(row["peak_rss_mb"] - rows[0]["peak_rss_mb"], 1)
    return rows


def _start_ray(workers: int) -> Optional[str]:
    """A local Ray for the benchmark (its files in a temporary folder); returns that folder, or None without Ray."""
    try:
        import ray
    except ImportError:
        return None
    folder = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=workers, include_dashboard=False, _temp_dir=folder, log_to_driver=False)
    return folder


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs=2, default=[100, 2000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--json", default=None)
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args([] if argv is None else argv)
    if args.rss_child is not None:
        _rss_child(args.rss_child)
        return {}
    torch.set_num_threads(args.threads)
    ray_folder = None if args.no_ray else _start_ray(args.workers)
    try:
        rows = throughput(qa_items(args.items), args.workers if ray_folder else 0)
    finally:
        if ray_folder is not None:
            import ray

            ray.shutdown()
            shutil.rmtree(ray_folder, ignore_errors=True)
    memory = peak_rss(args.sizes)
    notes = (f"n_steps=8 for integrated_gradients; {args.threads} torch threads in the driver; Ray actors: 1 CPU "
             "each (actor start and model load included); peak RSS of a fresh process, tiny 2-layer Llama, occlusion, "
             "Parquet output")
    from run_all import format_rows  # the same columns `make bench` prints elsewhere

    table = "\n\n".join([format_rows(rows), format_rows(memory), notes])
    result = {"rows": rows, "memory": memory, "notes": notes, "table": table}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    outcome = main(sys.argv[1:])
    if outcome:
        print(outcome["table"])
