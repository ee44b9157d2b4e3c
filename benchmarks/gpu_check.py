"""On a CUDA machine: every method equals its CPU result, the model stays on its device, and explain_batch's items/s.

Uses a random-weight model built from SmolLM2's config (the real weights are not needed for these checks and do not
travel well), read from a folder prepared beforehand on a machine that has the embedded model:

    python benchmarks/gpu_check.py --prepare FOLDER     # copies SmolLM2's config and tokenizer files into FOLDER
    python benchmarks/gpu_check.py FOLDER [--items 64] [--out results.json]

The second command needs no network. Without CUDA it says so and exits with status 0. The comparison builds the
model once on the CPU and copies it to the GPU (same weights), disables TF32 so both sides compute in float32, and
compares each method's scores relative to their largest magnitude. Throughput: a plain loop of ``explain`` against
one ``explain_batch`` for occlusion, LIME and integrated gradients over ``--items`` Q&A items (items per second).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_batch import items  # noqa: E402

MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "generation_config.json", "chat_template.jinja")
CHECK_PARAMS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"n_steps": 16}, "gradient_shap": {"n_samples": 8}, "smooth_grad": {"n_samples": 8},
    "square_grad": {"n_samples": 8}, "var_grad": {"n_samples": 8}, "lime": {"n_samples": 32},
    "kernel_shap": {"n_samples": 32}, "sobol": {"n_samples": 8},
}
THROUGHPUT: dict[str, dict[str, Any]] = {"occlusion": {}, "lime": {"n_samples": 64}, "integrated_gradients": {}}
TOLERANCE = 1e-3  # float32 on two devices, relative to the largest score


def prepare(folder: Path) -> None:
    """Copy the embedded model's config and tokenizer files (not its weights) into ``folder``."""
    from fair_forge.explainability import default_model_path

    source = Path(default_model_path())
    folder.mkdir(parents=True, exist_ok=True)
    copied = [name for name in MODEL_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copy2(source / name, folder / name)
    print(f"copied {copied} from {source} to {folder}")


def build(folder: Path) -> tuple[Any, Any]:
    """A random-weight float32 model from the folder's config (seeded), and the folder's tokenizer, on the CPU."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    return model, AutoTokenizer.from_pretrained(folder)


def compare(cpu_model: Any, gpu_model: Any, tokenizer: Any) -> list[dict[str, Any]]:
    """Every method on both devices for one item: the largest score difference relative to the largest score."""
    from fair_forge.explainability import AttributionExplainer, available_methods

    conversations, answers = items(2)
    rows = []
    for method in available_methods():
        params = CHECK_PARAMS.get(method, {})
        results = [AttributionExplainer(model, tokenizer).explain(conversations[1], answers[1], method=method,
                                                                  per_target=True, **params)
                   for model in (cpu_model, gpu_model)]
        cpu, gpu = (result.scores for result in results)
        scale = max(max(abs(s) for s in cpu), 1e-12)
        error = max(abs(a - b) for a, b in zip(cpu, gpu)) / scale
        rows.append({"method": method, "relative_difference": error, "ok": error <= TOLERANCE})
    return rows


def throughput(model: Any, tokenizer: Any, n_items: int) -> list[dict[str, Any]]:
    """Items per second of a plain loop and of explain_batch, per method (after one warm-up item)."""
    import torch

    from fair_forge.explainability import AttributionExplainer

    explainer = AttributionExplainer(model, tokenizer)
    conversations, answers = items(n_items)
    rows = []
    for method, params in THROUGHPUT.items():
        explainer.explain(conversations[0], answers[0], method=method, **params)  # warm-up (kernels, allocator)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for messages, answer in zip(conversations, answers):
            explainer.explain(messages, answer, method=method, **params)
        torch.cuda.synchronize()
        loop = time.perf_counter() - started
        started = time.perf_counter()
        batch = explainer.explain_batch(list(zip(conversations, answers)), method=method, show_progress=False,
                                        **params)
        torch.cuda.synchronize()
        packed = time.perf_counter() - started
        rows.append({"method": method, "items": n_items, "loop_items_per_s": n_items / loop,
                     "batch_items_per_s": n_items / packed, "speedup": loop / packed, "failures": len(batch.failures)})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prepare", action="store_true", help="copy the model's config and tokenizer into folder")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.folder)
        return {}
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine; nothing to check.")
        return {"cuda": False}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu_model, tokenizer = build(args.folder)
    gpu_model = copy.deepcopy(cpu_model).to("cuda")
    device = torch.cuda.get_device_name(0)
    equal = compare(cpu_model, gpu_model, tokenizer)
    stays = all(p.device.type == "cuda" for p in gpu_model.parameters())
    speed = throughput(gpu_model, tokenizer, args.items)
    stays = stays and all(p.device.type == "cuda" for p in gpu_model.parameters())
    result = {"cuda": True, "device": device, "model_stays_on_device": stays, "equal": equal, "throughput": speed}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if not stays or not all(row["ok"] for row in equal):
        raise SystemExit("gpu_check: a method differs between CPU and GPU, or the model left its device")
    return result


if __name__ == "__main__":
    main()
