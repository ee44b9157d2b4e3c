"""Gradient methods on the embedded model: median wall time, passes made, and the ratio to the floor; then
INTEGRATED_GRADIENTS at 10 steps side by side with interpreto and captum ``LLMGradientAttribution``.

The floor of a method is the time of the bare model calls it needs, measured in the same run: one explain call is
recorded with a forward pre-hook (rows, sequence length, ids or embeddings, ``logits_to_keep``, the length of a
cached prefix it continued, whether grad was enabled with an input requiring grad) and those calls are replayed directly on the model, each gradient call
followed by a backward of its summed gathered target logits, parameters frozen as the explainer freezes them.
Replays are interleaved with the timed explain calls, so both see the same machine load; on a shared machine
compare medians and ratios, never single absolute numbers.

Run: ``python -m benchmarks.bench_gradient [--repeats 3] [--no-peers] [--library-defaults] [--json out]``
(or ``python benchmarks/run_all.py gradient``). Targets (issue 2): every method within 1.3x of its floor;
INTEGRATED_GRADIENTS at 10 steps >= 5x faster than interpreto's at 10 steps, and faster than captum's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fair_forge.explainability import AttributionExplainer, load_default_model  # noqa: E402
from fair_forge.explainability.runtime.models import borrowed  # noqa: E402  (eval mode, frozen parameters)
from fair_forge.explainability.runtime.scorer import contiguous_head_input  # noqa: E402

THREADS = 2
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TARGET = "The capital of France is Paris."
GRANULARITY = "word"
PEER_N_STEPS = 10
FLOOR_TARGET = 1.3  # wall time / floor
INTERPRETO_TARGET = 5.0  # interpreto time / ours, at PEER_N_STEPS
CAPTUM_TARGET = 1.0  # captum time / ours, at PEER_N_STEPS

# Bench parameters: 10 rows (steps or samples) per sampled method keeps the module within ~5 minutes on 2 cores;
# ``--library-defaults`` runs the library's defaults instead (n_steps=64, n_samples=16), which takes longer.
METHODS: dict[str, dict[str, Any]] = {
    "saliency": {},
    "integrated_gradients": {"n_steps": PEER_N_STEPS},
    "gradient_shap": {"n_samples": 10},
    "smooth_grad": {"n_samples": 10},
    "square_grad": {"n_samples": 10},
    "var_grad": {"n_samples": 10},
    "input_x_gradient": {},
}


# ---- recording and replaying the model calls a method makes ---------------------------------------------------


@dataclass
class ModelCall:
    """One forward the explainer made: its shape and whether a backward of its output followed."""

    rows: int
    length: int
    embeds: bool  # inputs_embeds (True) or input_ids
    grad: bool  # grad enabled and the input requires grad -> a backward of the target logits follows
    logits_to_keep: Optional[int]
    attention_mask: bool
    use_cache: bool
    past_length: int  # tokens in the past_key_values given (a cached prefix), 0 without
    sample: torch.Tensor  # row 0 of the input (detached), replayed for every row

    def describe(self) -> dict[str, Any]:
        return {"rows": self.rows, "length": self.length, "inputs": "embeds" if self.embeds else "ids",
                "grad": self.grad, "logits_to_keep": self.logits_to_keep, "attention_mask": self.attention_mask,
                "use_cache": self.use_cache, "past_length": self.past_length}


@contextlib.contextmanager
def recording(model: torch.nn.Module) -> Iterator[list[ModelCall]]:
    """Record every forward of ``model`` (shape, ids/embeds, grad) while the block runs; the hook is always removed."""
    calls: list[ModelCall] = []

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = embeds if embeds is not None else ids
        past = kwargs.get("past_key_values")
        calls.append(ModelCall(
            rows=int(x.shape[0]), length=int(x.shape[1]), embeds=embeds is not None,
            grad=bool(torch.is_grad_enabled() and embeds is not None and embeds.requires_grad),
            logits_to_keep=kwargs.get("logits_to_keep"), attention_mask=kwargs.get("attention_mask") is not None,
            use_cache=bool(kwargs.get("use_cache", False)),
            past_length=int(past.get_seq_length()) if past is not None and hasattr(past, "get_seq_length") else 0,
            sample=x[:1].detach().clone(),
        ))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def _prefix_cache(model: torch.nn.Module, length: int, rows: int) -> Any:
    """A ``rows``-row KV cache of ``length`` tokens, like the scorer's cached prefix (built off the clock)."""
    hidden = model.get_input_embeddings().weight.shape[1]
    with torch.no_grad():
        cache = model(inputs_embeds=torch.zeros(1, length, hidden), use_cache=True).past_key_values
    cache.batch_repeat_interleave(rows)
    return cache


def replay(model: torch.nn.Module, calls: Sequence[ModelCall]) -> tuple[float, float]:
    """(wall, process CPU) seconds for the bare forward (+ backward of the summed gathered target logits) of each
    recorded call; a call that continued a cached prefix gets a cache of the same length and rows. The output layer
    gets a contiguous input, as in the scorer (``scoring.contiguous_head_input``), so the floor is the fastest bare
    way to make those calls."""
    prepared = []
    with borrowed(model):
        for call in calls:  # inputs (and prefix caches) built before the clock starts: the floor is the model's work
            kwargs: dict[str, Any] = {"use_cache": call.use_cache}
            if call.logits_to_keep is not None:
                kwargs["logits_to_keep"] = call.logits_to_keep
            if call.embeds:
                embeds = call.sample.expand(call.rows, *call.sample.shape[1:]).clone()
                kwargs["inputs_embeds"] = embeds.requires_grad_(call.grad)
            else:
                kwargs["input_ids"] = call.sample.expand(call.rows, -1).clone()
            if call.attention_mask:
                kwargs["attention_mask"] = torch.ones(call.rows, call.past_length + call.length, dtype=torch.long)
            if call.past_length:
                kwargs["past_key_values"] = _prefix_cache(model, call.past_length, call.rows)
                kwargs["position_ids"] = torch.arange(call.past_length, call.past_length + call.length).expand(
                    call.rows, -1)
            prepared.append((call.grad, kwargs))
        started, cpu_started = time.perf_counter(), time.process_time()
        for grad, kwargs in prepared:
            with torch.set_grad_enabled(grad), contiguous_head_input(model):
                logits = model(**kwargs).logits
                if grad:
                    kept = logits[:, :-1]
                    index = torch.zeros(*kept.shape[:2], 1, dtype=torch.long, device=kept.device)
                    kept.float().gather(-1, index).sum().backward()
        return time.perf_counter() - started, time.process_time() - cpu_started


# ---- timing ---------------------------------------------------------------------------------------------------


def _timed(run: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def _timed_cpu(run: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall, process CPU) seconds and the result; CPU time is less disturbed by other processes on the machine."""
    started, cpu_started = time.perf_counter(), time.process_time()
    result = run()
    return time.perf_counter() - started, time.process_time() - cpu_started, result


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def measure_method(explainer: AttributionExplainer, method: str, params: dict[str, Any], repeats: int,
                   max_repeats: int, time_box: float, between: Sequence[Callable[[], None]] = ()) -> dict[str, Any]:
    """A cheap warm-up, then timed calls each paired with one replay of the model calls the first one made.

    At least ``repeats`` timed calls, more (up to ``max_repeats``) while this method has used under ``time_box``
    seconds; the order of call and replay alternates so that neither always runs first. ``between`` callables
    (the peers) run after each pair, so that their timings interleave with ours under the same load.
    """

    def explain(with_params: dict[str, Any]) -> Any:
        return explainer.explain(MESSAGES, TARGET, method=method, granularity=GRANULARITY, **with_params)

    model = explainer.model
    warm = dict(params)
    for name in ("n_steps", "n_samples"):
        if name in warm:
            warm[name] = 1
    explain(warm)
    with recording(model) as calls:  # the first timed call is recorded; the hook itself costs microseconds
        wall, cpu, result = _timed_cpu(lambda: explain(params))
    recorded = list(calls)
    floor_wall, floor_cpu = replay(model, recorded)
    times, floors, cpus, floor_cpus = [wall], [floor_wall], [cpu], [floor_cpu]
    for other in between:
        other()
    spent = wall + floor_wall
    while len(times) < repeats or (len(times) < max_repeats and spent < time_box):
        if len(times) % 2:
            wall, cpu, result = _timed_cpu(lambda: explain(params))
            floor_wall, floor_cpu = replay(model, recorded)
        else:
            floor_wall, floor_cpu = replay(model, recorded)
            wall, cpu, result = _timed_cpu(lambda: explain(params))
        times.append(wall)
        floors.append(floor_wall)
        cpus.append(cpu)
        floor_cpus.append(floor_cpu)
        spent += wall + floor_wall
        for other in between:
            other()
    meta = result.metadata
    median, floor = _median(times), _median(floors)
    row: dict[str, Any] = {
        "method": method, "params": params, "repeats": len(times), "seconds": median, "floor_seconds": floor,
        "ratio_to_floor": median / floor, "paired_ratio": _median([t / f for t, f in zip(times, floors)]),
        "n_forward_passes": meta.n_forward_passes, "n_backward_passes": meta.n_backward_passes,
        "n_tokens_processed": meta.n_tokens_processed, "calls": [c.describe() for c in recorded],
        "cpu_ratio_to_floor": _median(cpus) / _median(floor_cpus), "cpu_seconds": cpus, "floor_cpu_seconds": floor_cpus,
        "times": times, "floor_times": floors, "meets_floor_target": median / floor <= FLOOR_TARGET,
    }
    if getattr(meta, "relative_convergence_delta", None) is not None:
        row["relative_convergence_delta"] = meta.relative_convergence_delta
    return row


# ---- peers: INTEGRATED_GRADIENTS at PEER_N_STEPS on the same input --------------------------------------------


def _prompt_text(tokenizer: Any) -> str:
    return tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)


def interpreto_runner(model: Any, tokenizer: Any) -> tuple[Callable[[int], Any], Callable[[Any], dict[str, Any]]]:
    """interpreto's IntegratedGradients (its generation explainer), all interpolations in one batch."""
    import importlib.metadata

    import interpreto

    prompt = _prompt_text(tokenizer)

    def run(n_steps: int) -> Any:
        explainer = interpreto.IntegratedGradients(
            model, tokenizer, batch_size=n_steps, granularity=interpreto.Granularity.WORD, n_perturbations=n_steps)
        return explainer(prompt, TARGET)

    def describe(output: Any) -> dict[str, Any]:
        return {"version": importlib.metadata.version("interpreto"), "batch_size": PEER_N_STEPS,
                "n_target_tokens": int(output[0].targets.shape[-1]),
                "how": "one forward of all interpolations, then one backward per target token"}

    return run, describe


def captum_runner(model: Any, tokenizer: Any) -> tuple[Callable[[int], Any], Callable[[Any], dict[str, Any]]]:
    """captum's LLMGradientAttribution with LayerIntegratedGradients on the input embedding layer."""
    import importlib.metadata

    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput

    attribution = LLMGradientAttribution(LayerIntegratedGradients(model, model.get_input_embeddings()), tokenizer)
    inp = TextTokenInput(_prompt_text(tokenizer), tokenizer)

    def run(n_steps: int) -> Any:
        return attribution.attribute(inp, target=TARGET, n_steps=n_steps)

    def describe(output: Any) -> dict[str, Any]:
        return {"version": importlib.metadata.version("captum"), "n_target_tokens": len(output.output_tokens),
                "how": "one integrated-gradients run (forward+backward of all steps) per target token"}

    return run, describe


class Peer:
    """A peer library's IG at PEER_N_STEPS: set up and warmed once, then timed each time it is called.

    Runs with the model in the same state as ours (eval, parameters frozen), the favourable case for the peer.
    Any failure, at set-up or later, turns into ``status = "n/a (reason)"``; the benchmark goes on.
    """

    def __init__(self, name: str, setup: Callable[..., Any], target: float, model: Any, tokenizer: Any) -> None:
        self.name, self.target, self.model = name, target, model
        self.times: list[float] = []
        self.info: dict[str, Any] = {}
        self.status = "ok"
        self._run: Optional[Callable[[int], Any]] = None
        try:
            run, describe = setup(model, tokenizer)
            with borrowed(model):
                self.info = describe(run(1))  # warm-up: one step, same input
            self._run = run
        except Exception as error:  # noqa: BLE001 - a missing or failing peer is reported, never fatal
            self._fail(error)

    def _fail(self, error: BaseException) -> None:
        reason = (str(error).splitlines() or [""])[0][:160]
        self.status = f"n/a ({type(error).__name__}: {reason})"
        self._run = None

    def __call__(self) -> None:
        if self._run is None:
            return
        try:
            with borrowed(self.model):
                self.times.append(_timed(lambda: self._run(PEER_N_STEPS))[0])
        except Exception as error:  # noqa: BLE001
            self._fail(error)

    def row(self, ours_seconds: float) -> dict[str, Any]:
        row: dict[str, Any] = {"library": self.name, "n_steps": PEER_N_STEPS, "status": self.status, **self.info}
        if self.status != "ok" or not self.times:
            row["seconds"] = None
            return row
        median = _median(self.times)
        speedup = median / ours_seconds
        row.update(seconds=median, times=self.times, repeats=len(self.times), ours_faster_by=speedup,
                   target=f">= {self.target:g}x" if self.target > 1 else "> 1x",
                   meets_target=speedup >= self.target if self.target > 1 else speedup > self.target)
        return row


# ---- table ----------------------------------------------------------------------------------------------------


def render_table(rows: list[dict[str, Any]], ours_ig: Optional[dict[str, Any]], peers: list[dict[str, Any]],
                 threads: int) -> str:
    lines = [
        f"gradient methods, SmolLM2-135M, word granularity, {threads} threads; medians over n runs; "
        f"ratio = median time / median floor (target <= {FLOOR_TARGET}); paired = median of per-run ratios; "
        "cpu = the same ratio in process CPU time",
        f"{'method':<22}{'params':<14}{'n':>3}{'median s':>10}{'floor s':>9}{'ratio':>7}{'paired':>8}{'cpu':>6}"
        f"{'fwd':>5}{'bwd':>5}  ok",
    ]
    for row in rows:
        params = ",".join(f"{k}={v}" for k, v in row["params"].items()) or "-"
        lines.append(
            f"{row['method']:<22}{params:<14}{row['repeats']:>3}{row['seconds']:>10.3f}{row['floor_seconds']:>9.3f}"
            f"{row['ratio_to_floor']:>7.2f}{row['paired_ratio']:>8.2f}"
            f"{row['cpu_ratio_to_floor']:>6.2f}{row['n_forward_passes']:>5}"
            f"{row['n_backward_passes']:>5}  {'yes' if row['meets_floor_target'] else 'NO'}")
    if ours_ig is not None and peers:
        lines.append("")
        lines.append(f"INTEGRATED_GRADIENTS at n_steps={PEER_N_STEPS}, same input, runs interleaved (medians; "
                     "peers with parameters frozen as ours)")
        lines.append(f"{'library':<12}{'n':>3}{'median s':>10}{'ours faster by':>16}  {'target':<7} ok")
        lines.append(f"{'fair_forge':<12}{ours_ig['repeats']:>3}{ours_ig['seconds']:>10.3f}{'1.00x':>16}")
        for peer in peers:
            if peer["seconds"] is None:
                lines.append(f"{peer['library']:<12}  {peer['status']}")
                continue
            lines.append(f"{peer['library']:<12}{peer['repeats']:>3}{peer['seconds']:>10.3f}"
                         f"{peer['ours_faster_by']:>15.2f}x  {peer['target']:<7} "
                         f"{'yes' if peer['meets_target'] else 'NO'}")
    return "\n".join(lines)


# ---- entry point ----------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark and return every number, the rendered table under "table" (printed by run_all / __main__).

    ``argv`` defaults to no arguments (``run_all`` calls ``main()`` while its own argv holds other words).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="minimum timed runs per method, after a warm-up")
    parser.add_argument("--max-repeats", type=int, default=9, help="more runs of cheap methods, up to this many")
    parser.add_argument("--time-box", type=float, default=8.0, help="seconds per method before stopping at --repeats")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--no-peers", action="store_true", help="skip interpreto and captum")
    parser.add_argument("--library-defaults", action="store_true",
                        help="run each method at the library's default parameters (slower) instead of 10 rows")
    parser.add_argument("--methods", nargs="*", default=None, choices=sorted(METHODS), help="a subset of methods")
    parser.add_argument("--json", default=None, help="also write the result dict to this file")
    args = parser.parse_args(list(argv) if argv is not None else [])
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    repeats = max(3, args.repeats)
    max_repeats = max(repeats, args.max_repeats)

    model, tokenizer = load_default_model()
    explainer = AttributionExplainer(model, tokenizer)
    peers: list[Peer] = []
    if not args.no_peers:  # set up and warmed before any timing; timed interleaved with our IG runs below
        peers = [Peer("interpreto", interpreto_runner, INTERPRETO_TARGET, model, tokenizer),
                 Peer("captum", captum_runner, CAPTUM_TARGET, model, tokenizer)]
    methods = {m: ({} if args.library_defaults else dict(p)) for m, p in METHODS.items()
               if args.methods is None or m in args.methods}
    rows: list[dict[str, Any]] = []
    ours_ig: Optional[dict[str, Any]] = None
    for method, params in methods.items():
        peer_turn = bool(peers) and params.get("n_steps") == PEER_N_STEPS
        row = measure_method(explainer, method, params, repeats, repeats if peer_turn else max_repeats,
                             args.time_box, between=peers if peer_turn else ())
        if peer_turn:
            ours_ig = row
        print(f"  {method}: {row['repeats']} runs, median {row['seconds']:.3f}s, floor {row['floor_seconds']:.3f}s, "
              f"x{row['ratio_to_floor']:.2f}", flush=True)
        rows.append(row)
    if peers and ours_ig is None:  # --library-defaults: IG at PEER_N_STEPS, timed with the peers
        ours_ig = measure_method(explainer, "integrated_gradients", {"n_steps": PEER_N_STEPS}, repeats, repeats,
                                 0.0, between=peers)
        rows.append(ours_ig)
    peer_rows = [peer.row(ours_ig["seconds"]) for peer in peers] if ours_ig is not None else []
    for peer in peer_rows:
        shown = peer["status"] if peer["seconds"] is None else (
            f"median {peer['seconds']:.3f}s, ours faster by {peer['ours_faster_by']:.2f}x")
        print(f"  {peer['library']} IG n_steps={PEER_N_STEPS}: {shown}", flush=True)

    table = render_table(rows, ours_ig, peer_rows, torch.get_num_threads())
    result: dict[str, Any] = {
        "table": table,
        "threads": torch.get_num_threads(),
        "input": {"messages": MESSAGES, "target": TARGET, "granularity": GRANULARITY},
        "methods": rows,
        "peer_n_steps": PEER_N_STEPS,
        "ours_integrated_gradients_seconds": None if ours_ig is None else ours_ig["seconds"],
        "peers": peer_rows,
        "targets": {
            "floor_ratio_max": FLOOR_TARGET,
            "all_within_floor_target": all(r["meets_floor_target"] for r in rows),
            "interpreto_min_speedup": INTERPRETO_TARGET,
            "captum_min_speedup": CAPTUM_TARGET,
            "peers_met": {p["library"]: p.get("meets_target") for p in peer_rows},
        },
        "wall_seconds": time.perf_counter() - started,
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2, default=str)
    return result


if __name__ == "__main__":
    output = main(sys.argv[1:])
    print(output["table"])
    print(f"({output['wall_seconds']:.1f} s)")
