"""engine="ray": a real local Ray with 2 CPU actors over a tiny model saved in float64. It reads its source window by
window, resumes an output a local run began, writes its parts with Ray's writers (named by our filename provider),
gives the local engine's results (to model_bound), JSONL lines and failure records, and an output it leaves
uncommitted and torn loads and resumes. Ray's files live in a temporary folder."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from fair_forge.explainability import AttributionBatchResult, AttributionExplainer, explain_dataset, load_results
from fair_forge.explainability.core.records import SETTINGS_KEY
from fair_forge.explainability.runs.sinks import JsonlSink, stored_settings
from fair_forge.explainability.text.prompt import build_model_input
from same_results import PACKING_DEPENDENT, close
from tolerances import ESTIMATOR_CONDITION, log_prob_magnitude, model_bound

pytestmark = pytest.mark.xdist_group("ray")  # one local Ray cluster (module fixture) in one test worker

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

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
def saved_model(tiny_gpt2, tmp_path: Path) -> Path:
    """A tiny GPT-2 saved in float64 (it loads back in float64, LayerNorm included): Ray's results equal the local
    engine's up to packing, an identity checked to ``engine_bound``'s float64 bound."""
    model, tokenizer = tiny_gpt2
    folder = tmp_path / "tiny-gpt2"
    model.double().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def explainer(saved_model: Path) -> AttributionExplainer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(saved_model).eval()
    return AttributionExplainer(model, AutoTokenizer.from_pretrained(saved_model))


@pytest.fixture
def ray_parts(monkeypatch) -> list[str]:
    """The names of the parts each Ray window wrote (the driver counts their failures right after the window); a
    Parquet part must carry the run settings in its schema metadata, as a local part does."""
    from fair_forge.explainability.runs import ray_engine

    names: list[str] = []
    count = ray_engine.count_failed

    def spy(parts: Iterator[Path]) -> int:
        parts = sorted(parts)
        names.extend(part.name for part in parts)
        for part in parts:
            if part.suffix == ".parquet":
                assert stored_settings(part.parent.with_suffix("")) == json.loads(
                    pq.read_schema(part).metadata[SETTINGS_KEY])
        return count(parts)

    monkeypatch.setattr(ray_engine, "count_failed", spy)
    return names


def engine_bound(explainer: AttributionExplainer, result: Any, factor: float = 2.0) -> float:
    """model_bound of a score of ``result``'s item, on its chat layout (at least as long as a raw prompt's), times
    ``factor``: 2 for occlusion (a difference of two scores), ESTIMATOR_CONDITION for a gradient method."""
    model_input = build_model_input(explainer.tokenizer, target=result.target,
                                    messages=[{"role": "user", "content": result.prompt}])
    magnitude = log_prob_magnitude(explainer.model, model_input.input_ids)
    return factor * model_bound(explainer.model, magnitude, length=model_input.length, terms=model_input.n_target)


def _lines(path: Path) -> list[dict[str, Any]]:
    """A JSONL output's records as parsed lines, by item index, without what packing decides."""
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[1:]]
    for line in lines:
        for name in PACKING_DEPENDENT:
            line.get("result", {}).get("metadata", {}).pop(name, None)
    return sorted(lines, key=lambda line: line["index"])


def test_ray_resumes_a_local_output_window_by_window(local_ray, explainer, saved_model: Path, tmp_path: Path,
                                                     ray_parts: list[str], monkeypatch) -> None:
    from fair_forge.explainability.runs import ray_engine

    local = explain_dataset(explainer, ROWS, **SETTINGS)
    out = tmp_path / "ray.parquet"
    first = explain_dataset(explainer, ROWS, out, limit=2, **SETTINGS)  # a run stopped after two items
    assert (first.n_explained, first.n_failed) == (2, 0)

    monkeypatch.setattr(ray_engine, "ITEMS_PER_RAY_WINDOW", 2)
    given: list[dict[str, Any]] = []  # the rows the source gave so far
    pulled: list[int] = []  # how many, each time a window goes to Ray
    from_items = ray.data.from_items
    monkeypatch.setattr(ray.data, "from_items", lambda rows: pulled.append(len(given)) or from_items(rows))

    def source() -> Iterator[dict[str, Any]]:
        for row in ROWS:
            given.append(row)
            yield row

    rest = explain_dataset(explainer, source(), out, engine="ray", num_workers=2, model_loader=str(saved_model),
                           **SETTINGS)
    assert (rest.n_skipped, rest.n_explained, rest.n_failed) == (2, 2, 2)
    assert pulled == [4, 6]  # two skipped rows and a window of two, then the next window: never more
    assert all(re.fullmatch(r"part-\d{20}-00000[01]-\d{6}-[0-9a-f]{32}-0\.parquet", name) for name in ray_parts)
    assert {name.split("-")[2] for name in ray_parts} == {"000000", "000001"}  # each window wrote its own parts
    assert not (tmp_path / "ray.parquet.parts").exists()  # committed

    remote = AttributionBatchResult.load(out)
    assert remote.indices == local.indices == [0, 1, 2, 5]
    for got, want in zip(remote, local):
        assert (got.prompt, got.target, got.tokens) == (want.prompt, want.target, want.tokens)
        assert got.scores == pytest.approx(want.scores, rel=0, abs=engine_bound(explainer, want))
    assert remote.failures == local.failures  # the malformed row (driver) and the empty target (actor)
    assert sorted(r.index for r in load_results(out)) == [0, 1, 2, 3, 4, 5]


def test_an_uncommitted_torn_ray_jsonl_output_loads_and_resumes(local_ray, explainer, saved_model: Path,
                                                                tmp_path: Path, ray_parts: list[str],
                                                                monkeypatch) -> None:
    whole = tmp_path / "local.jsonl"
    explain_dataset(explainer, ROWS, whole, **SETTINGS)
    out = tmp_path / "ray.jsonl"
    with monkeypatch.context() as patch:  # the driver is killed after Ray wrote, before the final commit
        patch.setattr(JsonlSink, "close", lambda self: self._handle.close())
        explain_dataset(explainer, ROWS, out, limit=4, engine="ray", num_workers=2, model_loader=str(saved_model),
                        **SETTINGS)
    parts = sorted((tmp_path / "ray.jsonl.parts").iterdir())
    assert [part.name for part in parts] == ray_parts
    assert all(re.fullmatch(r"part-\d{20}-000000-\d{6}-[0-9a-f]{32}\.jsonl", part.name) for part in parts)
    assert sorted(r.index for r in load_results(out)) == [0, 1, 2, 3]
    torn = parts[-1]
    text = torn.read_text(encoding="utf-8")
    torn.write_text(text[: len(text) - 20], encoding="utf-8")  # a kill in the middle of the part's last line
    loaded = sorted(r.index for r in load_results(out))
    assert len(loaded) == 3

    run = explain_dataset(explainer, ROWS, out, **SETTINGS)  # a local run resumes it and commits
    assert (run.n_skipped, run.n_explained + run.n_failed) == (3, 3)
    assert not (tmp_path / "ray.jsonl.parts").exists()
    assert json.loads(out.read_text(encoding="utf-8").splitlines()[0])["fair_forge_dataset"]["settings"] == \
        json.loads(whole.read_text(encoding="utf-8").splitlines()[0])["fair_forge_dataset"]["settings"]
    close(_lines(out), _lines(whole))  # the lines a local run writes, failures included, once each


def test_an_in_memory_ray_run_on_two_actors_equals_local(local_ray, explainer, saved_model: Path,
                                                         monkeypatch) -> None:
    from fair_forge.explainability.runs import ray_engine

    monkeypatch.setattr(ray_engine, "ITEMS_PER_RAY_BATCH", 1)  # batches of one item: both actors get some
    local = explain_dataset(explainer, ROWS, **SETTINGS)
    remote = explain_dataset(explainer, ROWS, engine="ray", num_workers=2, model_loader=str(saved_model), **SETTINGS)
    assert remote.indices == local.indices and remote.failures == local.failures
    for got, want in zip(remote, local):
        assert got.target == want.target
        assert got.scores == pytest.approx(want.scores, rel=0, abs=engine_bound(explainer, want))


def test_ray_missing_is_an_error_naming_the_extra(tiny_llama, monkeypatch) -> None:
    import importlib.util

    from fair_forge.explainability.runs import ray_engine

    model, tokenizer = tiny_llama
    real = importlib.util.find_spec

    def hide_ray(name: str, *args):
        return None if name.startswith("ray") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", hide_ray)
    with pytest.raises(ImportError, match=r"fair-forge-explainability\[ray\]"):
        explain_dataset(AttributionExplainer(model, tokenizer), ROWS, engine="ray", **SETTINGS)
    assert ray_engine.RAY_EXTRA_HINT


@pytest.mark.filterwarnings("ignore::fair_forge.explainability.runtime.memory.MemoryBudgetWarning")
def test_every_explainer_option_reaches_the_actors(local_ray, saved_model: Path) -> None:
    """Actors rebuild the driver's explainer from its whole config: with a 1-byte max_memory every gradient call holds
    one row, and checkpoint=True runs them without the prefix cache, so the pass counts (independent of packing at one
    row per call) are the local run's and not those of default options."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(saved_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(saved_model)
    rows = [row for row in ROWS if row.get("target") or row.get("answer")]
    settings = {**SETTINGS, "method": "integrated_gradients", "n_steps": 4}
    options = AttributionExplainer(model, tokenizer, max_memory=1, checkpoint=True)
    local = explain_dataset(options, rows, **settings)
    remote = explain_dataset(options, rows, engine="ray", num_workers=2, model_loader=str(saved_model), **settings)
    default = explain_dataset(AttributionExplainer(model, tokenizer), rows, **settings)
    assert len(local) == len(remote) == len(default) == len(rows) and not remote.failures
    counts = [[(r.metadata.n_forward_passes, r.metadata.n_tokens_processed) for r in run]
              for run in (local, remote, default)]
    assert counts[1] == counts[0] != counts[2]
    for got, want in zip(remote, local):
        assert got.scores == pytest.approx(want.scores, rel=0, abs=engine_bound(options, want, ESTIMATOR_CONDITION))
