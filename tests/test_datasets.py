"""explain_dataset: every input kind, generated targets, JSONL/Parquet outputs that load back equal, kill-and-resume,
torn tails, malformed rows, settings changes, summarize, and the `dataset` / `summarize` CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pytest

from fair_forge.explainability import (
    AttributionBatchResult,
    AttributionExplainer,
    AttributionMethod,
    AttributionResult,
    TokenAttribution,
    cli,
    explain_dataset,
    load_results,
    plot_summary,
    summarize,
)
from fair_forge.explainability.runs import pipeline as datasets
from fair_forge.explainability.cli import common as cli_common
from fair_forge.explainability.errors import InvalidInputError
from fair_forge.explainability.runtime.generation import generate_targets
from fair_forge.explainability.runs.sinks import JsonlSink, ParquetSink
from fair_forge.explainability.text.prompt import build_model_input
from same_results import PACKING_DEPENDENT, close
from tolerances import log_prob_magnitude, model_bound, to_float64

ITEMS = [
    {"question": "What is the capital of France?", "answer": "The capital of France is Paris.", "topic": "geo"},
    {"prompt": "The quick brown fox", "target": "jumps over the lazy dog.", "topic": "animals"},
    {"messages": [{"role": "system", "content": "Answer in one sentence."},
                  {"role": "user", "content": "Why is the sky blue?"}], "target": "Light scatters.", "topic": "sky"},
    {"question": "Where is Berlin?", "answer": "Berlin is in Germany.", "topic": "geo"},
    {"question": "Explain why dogs and cats are friends.", "answer": "They are friends!", "topic": "animals"},
]
SETTINGS = {"method": "occlusion", "show_progress": False}


@pytest.fixture
def explainer(tiny_llama) -> AttributionExplainer:
    model, tokenizer = tiny_llama
    return AttributionExplainer(model, tokenizer)


@pytest.fixture
def explainer64(tiny_llama) -> AttributionExplainer:
    """The model in float64: an item explained in a dataset's packed calls equals it explained alone, an identity
    checked to ``_packing``'s float64 bound."""
    model, tokenizer = tiny_llama
    return AttributionExplainer(to_float64(model), tokenizer)


def _packing(explainer: AttributionExplainer, **item: Any) -> float:
    """model_bound of an occlusion score on ``item`` (build_model_input's arguments): a difference of two rows."""
    model_input = build_model_input(explainer.tokenizer, **item)
    magnitude = log_prob_magnitude(explainer.model, model_input.input_ids)
    return 2 * model_bound(explainer.model, magnitude, length=model_input.length, terms=model_input.n_target)


def _comparable(result: AttributionResult) -> dict[str, Any]:
    """A result without its timing (the one field two runs of the same item may differ in)."""
    data = result.model_dump(mode="json")
    data["metadata"].pop("compute_time_seconds")
    return data


def _same(left: AttributionBatchResult, right: AttributionBatchResult) -> None:
    """The same items, texts and failures; scores equal up to the rounding packing may change."""
    assert left.indices == right.indices
    for a, b in zip(left, right):
        a_data, b_data = (r.model_dump(mode="json") for r in (a, b))
        for data in (a_data, b_data):
            for name in PACKING_DEPENDENT:
                data["metadata"].pop(name)
        close(a_data, b_data)
    assert left.failures == right.failures


@pytest.fixture
def reference(explainer) -> AttributionBatchResult:
    return explain_dataset(explainer, ITEMS, **SETTINGS)


def test_in_memory_run_equals_explain(explainer64) -> None:
    reference = explain_dataset(explainer64, ITEMS, **SETTINGS)
    assert reference.indices == [0, 1, 2, 3, 4] and not reference.failures
    messages = [{"role": "user", "content": ITEMS[0]["question"]}]
    direct = explainer64.explain(messages, ITEMS[0]["answer"], method="occlusion")
    bound = _packing(explainer64, messages=messages, target=ITEMS[0]["answer"])
    assert reference[0].scores == pytest.approx(direct.scores, rel=0, abs=bound)
    assert reference[2].prompt == "Answer in one sentence.\nWhy is the sky blue?"


def test_every_input_kind_gives_the_same_results(explainer, reference, tmp_path: Path) -> None:
    from datasets import Dataset, IterableDataset

    flat = [{**item, "messages": json.dumps(item["messages"])} if "messages" in item else item for item in ITEMS]
    frame = pd.DataFrame(flat)
    uniform = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")  # HF datasets: same keys
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    frame.to_csv(tmp_path / "items.csv", index=False)
    frame.to_parquet(tmp_path / "items.parquet")
    sources = {
        "generator": (item for item in ITEMS),
        "dataframe": frame,
        "hf_dataset": Dataset.from_list(uniform),
        "hf_iterable": IterableDataset.from_generator(lambda: iter(uniform)),
        "jsonl": jsonl,
        "csv": str(tmp_path / "items.csv"),
        "parquet": tmp_path / "items.parquet",
    }
    for name, source in sources.items():
        batch = explain_dataset(explainer, source, **SETTINGS)
        assert batch.indices == reference.indices, name
        for got, want in zip(batch, reference):
            assert got.scores == want.scores, name  # exact: the same items in the same packed calls
            assert (got.prompt, got.target, got.tokens) == (want.prompt, want.target, want.tokens), name


def test_pairs_and_column_mapping(explainer64) -> None:
    reference = explain_dataset(explainer64, ITEMS, **SETTINGS)  # alone vs packed with the others: float64 bounds
    pairs = explain_dataset(explainer64, [("The quick brown fox", "jumps over the lazy dog.")], **SETTINGS)
    bound = _packing(explainer64, prompt=ITEMS[1]["prompt"], target=ITEMS[1]["target"])
    assert pairs[0].scores == pytest.approx(reference[1].scores, rel=0, abs=bound)
    rows = [{"q": "Why is the sky blue?", "ctx": "Answer in one sentence.", "a": "Light scatters."}]
    mapped = explain_dataset(explainer64, rows, question="q", context="ctx", target="a", **SETTINGS)
    bound = _packing(explainer64, messages=ITEMS[2]["messages"], target=ITEMS[2]["target"])
    assert mapped[0].scores == pytest.approx(reference[2].scores, rel=0, abs=bound)


def test_a_named_column_that_is_absent_fails_before_any_model_call(explainer, monkeypatch) -> None:
    monkeypatch.setattr(explainer, "model", None)  # any model call would fail differently
    with pytest.raises(InvalidInputError, match="no column"):
        explain_dataset(explainer, pd.DataFrame(ITEMS[:1]), question="q", **SETTINGS)
    with pytest.raises(InvalidInputError, match="engine"):
        explain_dataset(explainer, ITEMS, engine="spark", **SETTINGS)
    with pytest.raises(InvalidInputError):
        explain_dataset(explainer, ITEMS, method="occlusion", n_steps=3, show_progress=False)


def test_missing_targets_are_generated_and_stored(explainer, tiny_llama, tmp_path: Path) -> None:
    model, tokenizer = tiny_llama
    rows = [{"prompt": "Paris is"}, {"prompt": "What is the capital", "target": "of France."},
            {"prompt": "The quick brown fox"}]
    batch = explain_dataset(explainer, rows, max_new_tokens=5, **SETTINGS)
    expected = generate_targets(model, tokenizer, [(None, "Paris is"), (None, "The quick brown fox")],
                                max_new_tokens=5)
    assert [r.target for r in batch] == [expected[0], "of France.", expected[1]]
    out = tmp_path / "out.jsonl"
    explain_dataset(explainer, rows, out, generate=True, max_new_tokens=5, **SETTINGS)
    records = {r.index: r for r in load_results(out)}
    assert records[1].outcome.target != "of France."
    assert records[1].metadata == {"reference_target": "of France.", "target_generated": True}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_outputs_load_back_equal_with_ids_and_metadata(explainer, reference, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"out{suffix}"
    run = explain_dataset(explainer, ITEMS + [{"question": "Empty answer", "answer": ""}], out, **SETTINGS)
    assert (run.n_explained, run.n_failed, run.n_skipped) == (5, 1, 0)
    loaded = AttributionBatchResult.load(out)
    assert [_comparable(r) for r in loaded] == [_comparable(r) for r in reference]
    assert all(r.method is AttributionMethod.OCCLUSION for r in loaded)  # behaves like the original (plots use .value)
    assert [(f.index, f.error_type) for f in loaded.failures] == [(5, "InvalidInputError")]
    records = sorted(load_results(out), key=lambda r: r.index)
    assert [r.metadata.get("topic") for r in records] == ["geo", "animals", "sky", "geo", "animals", None]
    assert len({r.item_id for r in records}) == 6


@pytest.mark.parametrize("block", [2, datasets.BLOCK])  # the crash inside the second block, or inside the only one
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_killed_run_resumes_to_the_uninterrupted_output(explainer, tmp_path: Path, monkeypatch, suffix: str,
                                                        block: int) -> None:
    monkeypatch.setattr(datasets, "BLOCK", block)
    whole = tmp_path / f"whole{suffix}"
    explain_dataset(explainer, ITEMS, whole, **SETTINGS)
    sink_class = JsonlSink if suffix == ".jsonl" else ParquetSink
    write = sink_class.write

    def crash_after_three(self, record) -> None:  # the process dies after the third record is written
        if self.written == 3:
            raise KeyboardInterrupt
        write(self, record)
        self.written += 1

    out = tmp_path / f"resumed{suffix}"
    with monkeypatch.context() as patch:
        patch.setattr(sink_class, "written", 0, raising=False)
        patch.setattr(sink_class, "write", crash_after_three)
        with pytest.raises(KeyboardInterrupt):
            explain_dataset(explainer, ITEMS, out, **SETTINGS)
    assert len(list(load_results(out))) == 3  # the interrupted output loads
    run = explain_dataset(explainer, ITEMS, out, **SETTINGS)
    assert (run.n_skipped, run.n_explained) == (3, 2)
    assert sorted(r.index for r in load_results(out)) == [0, 1, 2, 3, 4]  # no duplicates
    resumed, uninterrupted = AttributionBatchResult.load(out), AttributionBatchResult.load(whole)
    assert resumed.indices == uninterrupted.indices  # in the same order, and bit for bit (timing apart):
    assert [_comparable(r) for r in resumed] == [_comparable(r) for r in uninterrupted]
    assert resumed.failures == uninterrupted.failures


def test_a_source_that_breaks_leaves_an_output_that_resumes(explainer, tmp_path: Path) -> None:
    def breaking() -> Iterator[dict[str, Any]]:
        yield from ITEMS[:3]
        raise OSError("connection lost")

    out = tmp_path / "out.parquet"
    with pytest.raises(OSError):
        explain_dataset(explainer, breaking(), out, **SETTINGS)
    done = len(list(load_results(out)))
    assert explain_dataset(explainer, ITEMS, out, **SETTINGS).n_skipped == done
    _same(AttributionBatchResult.load(out), explain_dataset(explainer, ITEMS, **SETTINGS))


def test_parquet_parts_of_a_hard_kill_load_and_resume(explainer, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out.parquet"
    with monkeypatch.context() as patch:  # a kill before the final commit: staged parts only
        patch.setattr(ParquetSink, "close", ParquetSink._flush)
        explain_dataset(explainer, ITEMS[:2], out, **SETTINGS)
    assert not out.exists() and len(list(load_results(out))) == 2
    explain_dataset(explainer, ITEMS, out, **SETTINGS)
    assert out.exists() and not (tmp_path / "out.parquet.parts").exists()
    _same(AttributionBatchResult.load(out), explain_dataset(explainer, ITEMS, **SETTINGS))


def test_a_kill_between_commit_and_cleanup_duplicates_nothing(explainer, tmp_path: Path, monkeypatch) -> None:
    from fair_forge.explainability.runs import sinks

    out = tmp_path / "out.parquet"
    with monkeypatch.context() as patch:  # the merged file is in place, the merged parts are not yet deleted
        patch.setattr(sinks.shutil, "rmtree", lambda *args, **kwargs: None)
        explain_dataset(explainer, ITEMS[:2], out, **SETTINGS)
    assert list((tmp_path / "out.parquet.parts").glob("*.parquet"))
    assert sorted(r.index for r in load_results(out)) == [0, 1]
    explain_dataset(explainer, ITEMS, out, **SETTINGS)
    assert sorted(r.index for r in load_results(out)) == [0, 1, 2, 3, 4]


def test_a_torn_parquet_part_is_skipped_and_redone(explainer, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out.parquet"
    with monkeypatch.context() as patch:  # staged parts only, as a kill before the commit leaves them
        patch.setattr(ParquetSink, "close", ParquetSink._flush)
        explain_dataset(explainer, ITEMS[:2], out, **SETTINGS)
    import pyarrow.parquet as pq

    [part] = (tmp_path / "out.parquet.parts").iterdir()
    torn = part.with_name("part-99999999999999999999-000000-000000-0.parquet")  # sorts last: a later run's part
    torn.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # Ray's writer killed before the footer
    table = pq.ParquetFile(part).read()
    pq.write_table(table.take(list(reversed(range(len(table))))), part)  # Ray's writer need not keep the row order
    assert sorted(r.index for r in load_results(out)) == [0, 1]
    assert explain_dataset(explainer, ITEMS, out, **SETTINGS).n_skipped == 2
    assert not (tmp_path / "out.parquet.parts").exists()
    _same(AttributionBatchResult.load(out), explain_dataset(explainer, ITEMS, **SETTINGS))


def test_jsonl_parts_are_read_committed_once_and_never_twice(explainer, tmp_path: Path, monkeypatch) -> None:
    from fair_forge.explainability.runs import sinks

    whole = tmp_path / "whole.jsonl"
    explain_dataset(explainer, ITEMS, whole, **SETTINGS)
    lines = whole.read_text(encoding="utf-8").splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    explain_dataset(explainer, ITEMS[:2], out, **SETTINGS)
    parts = tmp_path / "out.jsonl.parts"
    parts.mkdir()
    (parts / "part-1-000000.jsonl").write_text("".join(lines[3:5]), encoding="utf-8")  # staged as Ray stages them
    assert sorted(r.index for r in load_results(out)) == [0, 1, 2, 3]
    with monkeypatch.context() as patch:  # the commit swapped the merged file in, the parts are not deleted yet
        patch.setattr(sinks.shutil, "rmtree", lambda *args, **kwargs: None)
        assert explain_dataset(explainer, ITEMS, out, **SETTINGS).n_skipped == 4
    assert (parts / "part-1-000000.jsonl").exists()
    assert sorted(r.index for r in load_results(out)) == [0, 1, 2, 3, 4]
    assert explain_dataset(explainer, ITEMS, out, **SETTINGS).n_skipped == 5
    assert not parts.exists() and len(out.read_text(encoding="utf-8").splitlines()) == 6
    _same(AttributionBatchResult.load(out), AttributionBatchResult.load(whole))


def test_a_torn_jsonl_tail_is_dropped(explainer, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    explain_dataset(explainer, ITEMS[:2], out, **SETTINGS)
    with out.open("a", encoding="utf-8") as handle:
        handle.write('{"index": 2, "item_id": "x", "resu')  # a line cut by a kill
    assert len(list(load_results(out))) == 2
    explain_dataset(explainer, ITEMS, out, **SETTINGS)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6 and all(json.loads(line) for line in lines)
    assert sorted(r.index for r in load_results(out)) == [0, 1, 2, 3, 4]


def test_malformed_rows_are_recorded_and_the_rest_finish(explainer, tmp_path: Path) -> None:
    source = tmp_path / "items.jsonl"
    lines = [json.dumps(ITEMS[0]), "{not json", json.dumps({"title": "no input"}), json.dumps(ITEMS[1])]
    source.write_text("\n".join(lines) + "\n")
    batch = explain_dataset(explainer, source, **SETTINGS)
    assert batch.indices == [0, 3]
    assert [(f.index, f.error_type) for f in batch.failures] == [(1, "InvalidInputError"), (2, "InvalidInputError")]
    assert "line 2 is not valid JSON" in batch.failures[0].message


def test_other_settings_into_an_existing_output_need_overwrite(explainer, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    explain_dataset(explainer, ITEMS[:2], out, **SETTINGS)
    with pytest.raises(InvalidInputError, match="other settings.*granularity"):
        explain_dataset(explainer, ITEMS, out, granularity="token", **SETTINGS)
    with pytest.raises(InvalidInputError, match="already exists"):
        explain_dataset(explainer, ITEMS, out, resume=False, **SETTINGS)
    run = explain_dataset(explainer, ITEMS, out, granularity="token", overwrite=True, **SETTINGS)
    assert run.n_skipped == 0 and {r.granularity.value for r in AttributionBatchResult.load(out)} == {"token"}


def test_a_user_id_column_keys_resume(explainer, tmp_path: Path) -> None:
    rows = [{**item, "uid": f"q{i}"} for i, item in enumerate(ITEMS)]
    out = tmp_path / "out.jsonl"
    explain_dataset(explainer, rows[:2], out, id_column="uid", **SETTINGS)
    run = explain_dataset(explainer, rows, out, id_column="uid", **SETTINGS)
    assert run.n_skipped == 2
    assert sorted(r.item_id for r in load_results(out)) == ["q0", "q1", "q2", "q3", "q4"]


def test_batch_save_load_and_tidy_table(reference, tmp_path: Path) -> None:
    table = reference.to_dataframe()
    assert len(table) == sum(len(r.attributions) for r in reference)
    first = table[table["item_index"] == 0]
    assert list(first["text"]) == reference[0].tokens and list(first["score"]) == reference[0].scores
    for name in ("batch.jsonl", "batch.parquet"):
        _same(AttributionBatchResult.load(reference.save(tmp_path / name)), reference)


def _result(texts: list[str], scores: list[float]) -> AttributionResult:
    peak = max(abs(s) for s in scores)
    attributions = [TokenAttribution(text=t, score=s, position=i, normalized_score=s / peak)
                    for i, (t, s) in enumerate(zip(texts, scores))]
    return AttributionResult(prompt=" ".join(texts), target="x", method="occlusion", granularity="word",
                             attributions=attributions)


def test_summarize_counts_and_means_by_case_folded_text() -> None:
    results = [_result(["Paris", "is", "big"], [2.0, -1.0, 0.5]), _result([" paris", "IS"], [-4.0, 1.0])]
    summary = summarize(results).set_index("feature")
    assert list(summary.index) == ["paris", "is", "big"]
    assert summary.loc["paris", "count"] == 2 and summary.loc["paris", "n_items"] == 2
    # exact: means of dyadic scores and of their ratios to dyadic peaks
    assert summary.loc["paris", "mean_score"] == -1.0
    assert summary.loc["paris", "mean_normalized_score"] == 0.0
    assert summary.loc["paris", "mean_abs_normalized_score"] == 1.0
    assert summary.loc["is", "mean_abs_normalized_score"] == (0.5 + 0.25) / 2
    assert list(summarize(results, min_count=2)["feature"]) == ["paris", "is"]
    figure = plot_summary(summarize(results), top=2)
    assert len(figure.axes[0].patches) == 2


def test_summarize_reads_outputs_and_tables_alike(reference, tmp_path: Path) -> None:
    path = reference.save(tmp_path / "out.parquet")
    expected = summarize(reference)
    pd.testing.assert_frame_equal(summarize(path), expected)
    pd.testing.assert_frame_equal(summarize(reference.to_dataframe()), expected)


def test_cli_dataset_exits_0_with_failed_items_and_summarizes(saved_tiny_llama: Path, tmp_path: Path, capsys) -> None:
    source = tmp_path / "items.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in [ITEMS[1], {"prompt": "x", "target": ""}]))
    out = tmp_path / "out.parquet"
    argv = ["dataset", str(source), "--out", str(out), "--method", "occlusion", "--model", str(saved_tiny_llama)]
    assert cli.main(argv) == 0
    assert "1 explained, 1 failed" in capsys.readouterr().out
    assert cli.main(argv) == 2  # the output exists: --resume or --overwrite
    assert cli.main([*argv, "--resume"]) == 0 and "2 already done" in capsys.readouterr().out
    assert cli.main(["summarize", str(out), "--top", "3"]) == 0
    assert "mean_abs_normalized_score" in capsys.readouterr().out


@pytest.mark.parametrize("extra, expected", [
    (["--out", "out.txt"], "must end in"),
    (["--out", "out.jsonl", "--column", "title=t"], "--column expects"),
    (["--out", "out.jsonl", "--column", "system=s", "--column", "context=c"], "same role"),
    (["--out", "out.jsonl", "--workers", "0"], ">= 1"),
    (["--out", "out.jsonl", "--method", "no_such_method"], "available"),
    (["--out", "out.jsonl", "--param", "n_steps"], "KEY=VALUE"),
])
def test_cli_dataset_bad_arguments_exit_2_before_the_model_loads(extra, expected, tmp_path: Path, capsys,
                                                                  monkeypatch) -> None:
    def no_model(*_args: Any) -> Any:
        raise AssertionError("bad arguments must be rejected before the model loads")

    monkeypatch.setattr(cli_common, "load_model", no_model)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "items.jsonl").write_text(json.dumps(ITEMS[0]) + "\n")
    assert cli.main(["dataset", "items.jsonl", *extra]) == 2
    assert expected in capsys.readouterr().err
    assert cli.main(["dataset", "missing.jsonl", "--out", "out.jsonl"]) == 2


@pytest.fixture
def saved_tiny_llama(tiny_llama, tmp_path: Path) -> Path:
    model, tokenizer = tiny_llama
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_an_endless_source_is_read_lazily(explainer) -> None:
    def endless() -> Iterator[dict[str, Any]]:
        while True:
            yield ITEMS[1]

    batch = explain_dataset(explainer, endless(), limit=3, **SETTINGS)
    assert batch.indices == [0, 1, 2]


def test_an_item_that_breaks_generation_fails_alone(explainer, tiny_llama) -> None:
    model, tokenizer = tiny_llama
    rows = [{"prompt": "Paris is"}, {"messages": [{"role": "wizard", "content": "hi"}]}, {"prompt": "The quick"}]
    batch = explain_dataset(explainer, rows, max_new_tokens=4, **SETTINGS)
    assert batch.indices == [0, 2]
    assert [(f.index, f.error_type) for f in batch.failures] == [(1, "InvalidInputError")]
    assert "unknown role" in batch.failures[0].message
    assert [r.target for r in batch] == generate_targets(model, tokenizer, [(None, "Paris is"), (None, "The quick")],
                                                         max_new_tokens=4)


def test_a_repeated_user_id_is_recorded(explainer) -> None:
    rows = [{**ITEMS[0], "uid": "a"}, {**ITEMS[1], "uid": "a"}, {**ITEMS[3], "uid": "b"}]
    batch = explain_dataset(explainer, rows, id_column="uid", **SETTINGS)
    assert batch.indices == [0, 2] and "already used" in batch.failures[0].message


def test_an_empty_generated_answer_is_recorded(tiny_gpt2) -> None:
    model, tokenizer = tiny_gpt2
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    only_end = {"suppress_tokens": [token for token in range(len(tokenizer)) if token != end]}  # the turn ends at once
    rows = [{"question": "What is the capital of France?"}, ITEMS[0]]
    batch = explain_dataset(AttributionExplainer(model, tokenizer), rows, generation_kwargs=only_end, **SETTINGS)
    assert batch.indices == [1]
    assert [(f.index, f.error_type) for f in batch.failures] == [(0, "ExplainabilityError")]
    assert "empty answer" in batch.failures[0].message
