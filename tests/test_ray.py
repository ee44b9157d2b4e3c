"""engine="ray": a real local Ray with 2 CPU actors over a tiny saved model resumes an output a local run began, and
gives the local engine's results (to 1e-5) and failure records. Ray's files live in a temporary folder."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from fair_forge.explainability import AttributionBatchResult, AttributionExplainer, explain_dataset, load_results

ray = pytest.importorskip("ray")

ROWS = [
    {"question": "What is the capital of France?", "answer": "The capital of France is Paris.", "topic": "geo"},
    {"prompt": "The quick brown fox", "target": "jumps over the lazy dog."},
    {"prompt": "Paris is"},  # no target: each actor generates it
    {"title": "no input column"},  # malformed: recorded on the driver
    {"prompt": "Why is the sky blue?", "target": ""},  # empty target: recorded by an actor
    {"question": "Where is Berlin?", "answer": "Berlin is in Germany.", "topic": "geo"},
]
SETTINGS = {"method": "occlusion", "show_progress": False, "max_new_tokens": 4}


@pytest.fixture(scope="module")
def local_ray():
    folder = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=folder, log_to_driver=False)
    yield ray
    ray.shutdown()
    patch.undo()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def saved_model(tiny_llama, tmp_path: Path) -> Path:
    model, tokenizer = tiny_llama
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_ray_equals_local_with_failures_and_resume(local_ray, saved_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(saved_model).eval()
    explainer = AttributionExplainer(model, AutoTokenizer.from_pretrained(saved_model))
    local = explain_dataset(explainer, ROWS, **SETTINGS)

    out = tmp_path / "ray.parquet"
    first = explain_dataset(explainer, ROWS, out, limit=2, **SETTINGS)  # a run stopped after two items
    assert (first.n_explained, first.n_failed) == (2, 0)
    ray_settings = {**SETTINGS, "engine": "ray", "num_workers": 2, "model_loader": str(saved_model)}
    rest = explain_dataset(explainer, ROWS, out, **ray_settings)  # Ray resumes it (one Ray run keeps the test short)
    assert (rest.n_skipped, rest.n_explained, rest.n_failed) == (2, 2, 2)

    remote = AttributionBatchResult.load(out)
    assert remote.indices == local.indices == [0, 1, 2, 5]
    for got, want in zip(remote, local):
        assert (got.prompt, got.target, got.tokens) == (want.prompt, want.target, want.tokens)
        assert got.scores == pytest.approx(want.scores, abs=1e-5)
    assert remote.failures == local.failures
    assert sorted(r.index for r in load_results(out)) == [0, 1, 2, 3, 4, 5]


def test_ray_missing_is_an_error_naming_the_extra(tiny_llama, monkeypatch) -> None:
    import importlib.util

    from fair_forge.explainability import ray_engine

    model, tokenizer = tiny_llama
    real = importlib.util.find_spec

    def hide_ray(name: str, *args):
        return None if name.startswith("ray") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", hide_ray)
    with pytest.raises(ImportError, match=r"fair-forge-explainability\[ray\]"):
        explain_dataset(AttributionExplainer(model, tokenizer), ROWS, engine="ray", **SETTINGS)
    assert ray_engine.RAY_EXTRA_HINT
