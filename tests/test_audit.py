"""The fairness audit: a planted decision on one protected word puts all the mass and the whole gap there; per-item
numbers equal a direct computation from explain(); group means, bootstrap intervals and differences equal numpy's;
resume, failures, JSON, escaped HTML, the plot, and the `audit` command."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fair_forge.explainability import AttributionExplainer, AuditReport, InvalidInputError, audit, cli, swap
from fair_forge.explainability.cli import common as cli_common
from fair_forge.explainability.core.audit import ALL_ITEMS, AuditItem, AuditSettings, seeded_rng
from fair_forge.explainability.runs.sinks import JsonlSink, load_results
from fair_forge.explainability.text.prompt import build_model_input
from test_fairness import PLANTED, PlantedDecision
from tolerances import log_prob_magnitude, model_bound, sum_bound, to_float64

QUIET = {"show_progress": False}


def _planted(tokenizer) -> AttributionExplainer:
    """The decision margin log p(France) - log p(he) is 6 when " Paris" is in the input and 0 without it."""
    ids = {word: tokenizer(word, add_special_tokens=False)["input_ids"] for word in (" Paris", " France", " he")}
    assert all(len(v) == 1 for v in ids.values())
    return AttributionExplainer(PlantedDecision(len(tokenizer), ids[" Paris"][0], ids[" France"][0],
                                                ids[" he"][0]).eval(), tokenizer)


PLANTED_ITEMS = [
    {"prompt": f"The capital is {city} and the city is big.", "target": "France", "contrast_target": "he",
     "place": city}
    for city in ("Paris", "Rome")
] + [{"prompt": f"We flew to {city} today, then home.", "target": "France", "contrast_target": "he", "place": city}
     for city in ("Paris", "Rome")]


def test_a_decision_on_one_protected_word_carries_all_the_mass_and_the_whole_gap(gpt2_tokenizer) -> None:
    report = audit(_planted(gpt2_tokenizer), PLANTED_ITEMS, protected=["Paris", "Rome"], group="place",
                   counterfactual=[("Paris", "Rome")], method="kernel_shap", exact=True, **QUIET)
    assert report.failures == [] and [item.group for item in report.items] == ["Paris", "Rome", "Paris", "Rome"]
    for item in report.items:
        with_key = item.group == "Paris"
        # known answers of the float64 planted model (test_fairness.PLANTED)
        assert item.target_score == pytest.approx(6.0 if with_key else 0.0, abs=PLANTED)
        assert item.protected_share == (pytest.approx(1.0, abs=PLANTED) if with_key else None)  # no mass at all
        assert item.protected_signed == pytest.approx(6.0 if with_key else 0.0, abs=PLANTED)
        assert item.protected_words == [item.group]
        assert item.counterfactual_gap == pytest.approx(6.0 if with_key else -6.0, abs=PLANTED)
        assert item.gap_on_protected == pytest.approx(item.counterfactual_gap, abs=PLANTED)  # Shapley: all of it
        (carrier,) = item.carriers
        assert (carrier.text, carrier.counterfactual_text, carrier.protected) == (
            item.group, "Rome" if with_key else "Paris", True)
    gap = next(d for d in report.differences if d.metric == "counterfactual_gap")
    assert (gap.group, gap.versus, gap.difference, gap.ci_low, gap.ci_high) == ("Paris", "Rome", *[
        pytest.approx(12.0, abs=2 * PLANTED)] * 3)  # a difference of two gaps, each within PLANTED
    assert report.estimate("target_score", "Paris").mean == pytest.approx(6.0, abs=PLANTED)  # a mean of them


QUESTIONS = ["Should she be promoted? She leads the team.", "Is he ready? His work is good.",
             "The nurse said she was tired.", "Is the cat black?"]


@pytest.fixture
def explainer(tiny_gpt2) -> AttributionExplainer:
    model, tokenizer = tiny_gpt2
    return AttributionExplainer(model, tokenizer)


@pytest.fixture
def explainer64(tiny_gpt2) -> AttributionExplainer:
    """On the model in float64: the audit's records and direct explain() calls are one computation packed
    differently, an identity checked to ``packing``'s float64 bound."""
    model, tokenizer = tiny_gpt2
    return AttributionExplainer(to_float64(model), tokenizer)


def packing(explainer: AttributionExplainer, messages: list[dict[str, str]]) -> float:
    """model_bound of an occlusion score of the Yes-vs-No margin on ``messages``: a difference (x2) of two rows'
    log-probs of both answers."""
    model, tokenizer = explainer.model, explainer.tokenizer
    model_input = build_model_input(tokenizer, target="Yes", messages=messages)
    terms = model_input.n_target + build_model_input(tokenizer, target="No", messages=messages).n_target
    magnitude = log_prob_magnitude(model, model_input.input_ids)
    return 2 * model_bound(model, magnitude, length=model_input.length, terms=terms)


def _items() -> list[dict[str, Any]]:
    return [{"question": q, "target": "Yes", "contrast_target": "No", "group": "ab"[i % 2]}
            for i, q in enumerate(QUESTIONS)]


def test_item_numbers_equal_a_direct_computation(explainer64, tmp_path: Path) -> None:
    """Each row from the audit's own records, by the definitions; the records agree with explain() (packing apart)."""
    words = ["she", "he", "her", "his"]
    out = tmp_path / "report.json"
    explainer = explainer64
    report = audit(explainer, _items(), protected=words, group="group", counterfactual="gender", method="occlusion",
                   out=out, **QUIET)
    assert report.failures == []
    records = {(r.item_id.split("-")[0], r.outcome.prompt): r.outcome for r in load_results(out.with_name(
        "report.records.jsonl"))}
    for item, question in zip(report.items, QUESTIONS):
        plain = records["plain", question]
        x = [{"role": "user", "content": question}]
        direct = explainer.explain(x, "Yes", contrast_target="No", method="occlusion")
        np.testing.assert_allclose(plain.scores, direct.scores, rtol=0, atol=packing(explainer, x))
        protected = [a.text.lower() in words for a in plain.attributions]
        scores = np.array(plain.scores)
        assert item.target_score == plain.metadata.target_score
        assert item.target_score == pytest.approx(direct.metadata.target_score, abs=packing(explainer, x) / 2)
        # exact: protected_mass does these numpy sums on the same scores
        assert item.protected_share == float(np.abs(scores[protected]).sum()) / float(np.abs(scores).sum())
        assert item.protected_signed == float(scores[protected].sum())
        assert item.protected_words == [a.text for a, p in zip(plain.attributions, protected) if p]
        if question == "Is the cat black?":
            assert "no 'gender' word" in item.no_counterfactual and item.counterfactual_gap is None
            assert ("counterfactual", question) not in records
            continue
        other = records["counterfactual", question]
        direct = explainer.explain(x, "Yes", contrast_target="No", counterfactual=swap(x, "gender"),
                                   method="occlusion")
        np.testing.assert_allclose(other.scores, direct.scores, rtol=0, atol=packing(explainer, x))
        assert item.counterfactual_gap == other.metadata.target_score - other.metadata.counterfactual_score  # exact
        assert item.counterfactual_prompt == swap(question, "gender")
        assert sorted((c.text, c.counterfactual_text, c.score) for c in item.carriers) == sorted(
            (a.text, a.counterfactual_text, a.score) for a in other.attributions)
        assert all(c.protected for c in item.carriers)  # every swapped word is a protected one
        # the same scores summed strongest first (the carriers' order)
        order = sum_bound(sum(abs(score) for score in other.scores), len(other.scores))
        assert item.gap_on_protected == pytest.approx(sum(other.scores), rel=0, abs=order)
    overall = report.estimate("protected_share")
    shares = [i.protected_share for i in report.items]
    assert overall.n == 4 and overall.mean == float(np.mean(shares))  # exact: the same numpy mean
    assert report.estimate("counterfactual_gap").n == 3


def _settings(**overrides: Any) -> AuditSettings:
    fields = {"model_name": "m", "method": "occlusion", "granularity": "word", "protected": {"protected": ["she"]},
              "group": "g", "n_bootstrap": 500, "confidence": 0.9, "seed": 7}
    return AuditSettings(**{**fields, **overrides})


def _hand_items(groups: str, seed: int = 3) -> list[AuditItem]:
    values = np.random.default_rng(seed).normal(size=len(groups)) + np.array([2.0 * "abc".index(g) for g in groups])
    return [AuditItem(index=i, item_id=str(i), group=g, target_score=float(v), counterfactual_gap=float(-v))
            for i, (g, v) in enumerate(zip(groups, values))]


def _percentile_interval(values: np.ndarray, settings: AuditSettings, *key: str) -> tuple[float, float]:
    """The percentile bootstrap interval from its definition, with the report's documented Generator."""
    rng = np.random.default_rng([settings.seed, zlib.crc32("\x1f".join(key).encode())])
    means = values[rng.integers(0, len(values), size=(settings.n_bootstrap, len(values)))].mean(axis=1)
    return tuple(np.quantile(means, [0.05, 0.95]))


def test_group_means_intervals_and_differences() -> None:
    items = _hand_items("aabbbab" * 3)
    settings = _settings()
    report = AuditReport.build(settings, items)
    for group in ("a", "b"):
        values = np.array([item.target_score for item in items if item.group == group])
        estimate = report.estimate("target_score", group)
        # exact: the same numpy means and quantiles of the same draws
        assert (estimate.n, estimate.mean) == (len(values), values.mean())
        assert (estimate.ci_low, estimate.ci_high) == _percentile_interval(values, settings, "target_score", group)
        assert estimate.ci_low <= estimate.mean <= estimate.ci_high
    assert AuditReport.build(settings, items) == report  # the seed reproduces every interval
    other = AuditReport.build(_settings(seed=8), items).estimate("target_score", "a")
    assert other.mean == report.estimate("target_score", "a").mean and other.ci_low != report.estimate(
        "target_score", "a").ci_low
    score, gap = (next(d for d in report.differences if d.metric == m) for m in ("target_score", "counterfactual_gap"))
    assert (score.group, score.versus) == ("a", "b") and score.difference < 0 < gap.difference  # b is shifted by +2
    assert score.ci_low <= score.difference <= score.ci_high < 0
    summary = report.summary()
    assert list(summary["group"]) == [ALL_ITEMS, "a", "b"] and list(summary["n_items"]) == [21, 9, 12]
    assert summary.loc[1, "target_score"] == report.estimate("target_score", "a").mean  # exact: copied


def test_three_groups_each_against_the_rest_and_items_without_a_group() -> None:
    items = _hand_items("abcabcabcc") + [AuditItem(index=10, item_id="10", target_score=5.0)]
    report = AuditReport.build(_settings(), items)
    differences = [d for d in report.differences if d.metric == "target_score"]
    assert [(d.group, d.versus, d.n, d.n_versus) for d in differences] == [
        ("a", None, 3, 7), ("b", None, 3, 7), ("c", None, 4, 6)]
    rest = [i.target_score for i in items if i.group in ("a", "b")]
    assert differences[2].difference == (  # exact: the same numpy means
        np.mean([i.target_score for i in items if i.group == "c"]) - np.mean(rest))
    assert report.estimate("target_score", "(no group)").n == 1 and report.estimate("target_score").n == 11


def test_protected_words_are_matched_whole_and_case_insensitively(explainer) -> None:
    rows = [{"prompt": "The shed: she and SHE, not the hem.", "target": "Yes",
             "protected_spans": [[4, 8], {"start": 10, "end": 13, "attribute": "person"}]}]
    words = audit(explainer, rows, protected={"gender": ["she", "he"], "place": ["shed"]}, **QUIET).items[0]
    assert words.protected_words == ["shed", "she", "SHE"]  # not "The" nor "hem"
    assert set(words.attribute_shares) == {"gender", "place"}
    # the words are disjoint: the same |scores| (shares <= 1) summed in other groupings, over one total
    order = sum_bound(1.0, len(words.protected_words) + 2)
    assert sum(words.attribute_shares.values()) == pytest.approx(words.protected_share, rel=0, abs=order)
    spans = audit(explainer, rows, protected="spans", **QUIET).items[0]
    assert spans.protected_words == ["shed", "she"]
    bad = audit(explainer, [{**rows[0], "protected_spans": [[30, 99]]}], protected="spans", **QUIET)
    assert [(f.stage, f.error_type) for f in bad.failures] == [("input", "InvalidInputError")]
    assert "does not lie in the prompt" in bad.failures[0].message
    unreadable = audit(explainer, [rows[0], 42], protected=["she"], **QUIET)  # a row that maps to no item
    assert [(f.index, f.stage, f.error_type) for f in unreadable.failures] == [(1, "input", "InvalidInputError")]
    assert "an item must be a dict" in unreadable.failures[0].message and len(unreadable.items) == 2


def test_every_item_stays_in_the_report_with_its_reason(explainer) -> None:
    def breaks(x: Any) -> Any:
        raise RuntimeError("builder broke")

    rows = [{"question": "Is she ready?", "target": "Yes"},
            {"question": "Is the cat black?", "target": "Yes"},  # nothing to swap
            {"messages": [{"role": "wizard", "content": "Is he ready?"}], "target": "Yes"},  # fails to explain
            {"question": "Is he here?"},  # no target
            {"question": "Is he tall?", "target": "Yes", "counterfactual": [{"role": "user", "content": "Is X tall?"}]}]
    report = audit(explainer, rows, protected=["she", "he"], counterfactual="gender", method="occlusion", **QUIET)
    assert [item.index for item in report.items] == [0, 1, 2, 3, 4]
    assert report.items[0].counterfactual_gap is not None and "no 'gender' word" in report.items[1].no_counterfactual
    assert [(f.index, f.stage) for f in report.failures] == [(2, "explanation"), (3, "input")]
    assert "unknown role" in report.items[2].no_counterfactual  # swap refuses the chat too
    assert report.items[4].carriers[0].counterfactual_text == "X"  # the item's own x' wins over the swap
    broken = audit(explainer, rows[:1], protected=["she"], counterfactual=breaks, method="occlusion", **QUIET)
    assert [(f.stage, f.error_type, f.message) for f in broken.failures] == [
        ("counterfactual", "RuntimeError", "builder broke")]
    assert broken.items[0].target_score is not None and broken.settings.counterfactual.endswith("breaks")


@pytest.mark.parametrize("options, match", [
    ({"protected": "she"}, "protected=\\['she'\\]"), ({"protected": []}, "non-empty"),
    ({"counterfactual": "religion"}, "unknown attribute"), ({"counterfactual": [("a", "a")]}, "itself"),
    ({"n_bootstrap": 0}, "n_bootstrap"), ({"confidence": 1.0}, "confidence"), ({"seed": -1}, "seed"),
    ({"out": "report.txt"}, "report"), ({"group": ""}, "group"), ({"method": "nope"}, "available"),
    ({"granularity": "paragraph"}, "granularity"),
])
def test_bad_options_fail_before_any_model_call(explainer, monkeypatch, options, match) -> None:
    monkeypatch.setattr(explainer.model, "forward", lambda *a, **k: pytest.fail("the model was called"))
    with pytest.raises(InvalidInputError, match=match):
        audit(explainer, _items(), **{"protected": ["she"], **options, **QUIET})


def test_an_interrupted_audit_resumes_to_the_same_report(explainer, tmp_path: Path, monkeypatch) -> None:
    settings = {"protected": ["she", "he", "her", "his"], "group": "group", "counterfactual": "gender",
                "method": "occlusion", **QUIET}
    whole = audit(explainer, _items(), out=tmp_path / "whole.json", **settings)
    write = JsonlSink.write

    def crash_after_three(self, record) -> None:
        if self.written == 3:
            raise KeyboardInterrupt
        write(self, record)
        self.written += 1

    out = tmp_path / "resumed.json"
    with monkeypatch.context() as patch:
        patch.setattr(JsonlSink, "written", 0, raising=False)
        patch.setattr(JsonlSink, "write", crash_after_three)
        with pytest.raises(KeyboardInterrupt):
            audit(explainer, _items(), out=out, **settings)
    records = tmp_path / "resumed.records.jsonl"
    assert len(records.read_text().splitlines()) == 1 + 3  # the header and three records
    calls = []
    monkeypatch.setattr(JsonlSink, "write", lambda self, record: (calls.append(record), write(self, record)))
    resumed = audit(explainer, _items(), out=out, **settings)
    assert len(calls) == 7 - 3  # 4 plain + 3 counterfactual explanations, 3 of them done before
    assert resumed == whole
    assert AuditReport.model_validate_json(out.read_text()) == resumed  # the JSON report round-trips equal
    with pytest.raises(InvalidInputError, match="already exists"):
        audit(explainer, _items(), out=out, resume=False, **settings)


def _hostile_report(explainer) -> AuditReport:
    rows = [{"prompt": "<script>alert(1)</script> she <b>", "target": "Yes", "group": "<img src=x onerror=alert(2)>"},
            {"prompt": "he <b> said", "target": "Yes", "group": "plain"}]
    return audit(explainer, rows, protected=["she", "he", "<b>"], group="group", counterfactual="gender",
                 method="occlusion", **QUIET)


def test_html_escapes_every_user_string_and_embeds_the_plot(explainer, tmp_path: Path) -> None:
    report = _hostile_report(explainer)
    assert report.items[0].protected_words == ["she", "<", "b", ">"]  # a phrase over three word features
    page = report.save_html(tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert page.count("<script") == 0 and 'src="data:image/png;base64,' in page
    assert "default-src 'none'" in page and "she \u2192 he" in page


def test_json_round_trip_and_the_plot_bars(explainer) -> None:
    report = _hostile_report(explainer)
    assert AuditReport.model_validate_json(report.model_dump_json()) == report
    figure = report.plot()
    assert type(figure).__name__ == "Figure" and len(figure.axes) == 2
    for axes, metric in zip(figure.axes, ("protected_share", "counterfactual_gap")):
        bars = axes.patches
        assert len(bars) == 3  # every item, then the two groups
        means = [report.estimate(metric, g).mean for g in (ALL_ITEMS, *sorted(["<img src=x onerror=alert(2)>",
                                                                                  "plain"]))]
        assert [bar.get_width() for bar in bars] == means  # exact: the bars are drawn from the means


# ---- the command line -------------------------------------------------------------------------------------------------


@pytest.fixture
def items_file(tmp_path: Path) -> Path:
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _items()), encoding="utf-8")
    return path


@pytest.mark.parametrize("extra, expected", [
    ([], "one of the arguments --protected --protected-spans is required"),
    (["--protected", "she", "--out", "r.txt"], "report"),
    (["--protected", "=she"], "ATTRIBUTE=words"),
    (["--protected", "she", "--counterfactual", "religion"], "unknown attribute"),
    (["--protected", "she", "--swap", "Anna"], "WORD=OTHER"),
    (["--protected", "she", "--confidence", "1.5"], "confidence"),
    (["--protected", "she", "--bootstrap", "0"], "n_bootstrap"),
    (["--protected", "she", "--column", "counterfactual=x"], "--column expects"),
    (["--protected", "she", "--method", "nope"], "available"),
])
def test_cli_bad_arguments_exit_2_before_the_model_loads(extra, expected, items_file: Path, capsys,
                                                         monkeypatch) -> None:
    monkeypatch.setattr(cli_common, "load_model", lambda *_: pytest.fail("the model was loaded"))
    out = ["--out", str(items_file.with_name("report.json"))] if "--out" not in extra else []
    try:
        code = cli.main(["audit", "--input", str(items_file), *out, *extra])
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1
    assert cli.main(["audit", "--input", "missing.jsonl", "--out", "r.json", "--protected", "she"]) == 2


def test_cli_audit_writes_the_report_and_resumes(saved_tiny_model: Path, items_file: Path, capsys,
                                                 monkeypatch) -> None:
    out = items_file.with_name("report.json")
    argv = ["audit", "--input", str(items_file), "--out", str(out), "--protected", "gender=she,he,her,his",
            "--group", "group", "--counterfactual", "gender", "--model", str(saved_tiny_model), "--bootstrap", "200"]
    assert cli.main(argv) == 0
    assert "4 items, 0 failures" in capsys.readouterr().out
    report = AuditReport.model_validate_json(out.read_text(encoding="utf-8"))
    assert report.settings.method == "occlusion" and report.groups == ["a", "b"]
    assert report.settings.protected == {"gender": ["she", "he", "her", "his"]}
    assert cli.main(argv) == 2 and "--resume" in capsys.readouterr().err  # its records exist
    monkeypatch.setattr(JsonlSink, "write", lambda *_: pytest.fail("a finished audit resumed explains nothing"))
    html = out.with_suffix(".html")
    assert cli.main([*argv[:4], str(html), *argv[5:], "--resume"]) == 0  # report.records.jsonl is shared
    assert "Fairness audit" in html.read_text(encoding="utf-8")


def test_the_audit_explains_the_contrast_it_is_given(gpt2_tokenizer) -> None:
    """contrast="prob_diff": the decision score is p(yes) - p(no), from the planted logits (+3, -3, else 0)."""
    report = audit(_planted(gpt2_tokenizer), PLANTED_ITEMS[:2], protected=["Paris"], group="place",
                   contrast="prob_diff", method="occlusion", **QUIET)
    others = len(gpt2_tokenizer) - 2
    expected = (math.exp(3) - math.exp(-3)) / (math.exp(3) + math.exp(-3) + others)
    # float64 probabilities (PLANTED); without the key every logit is 0, so p(yes) and p(no) are one number
    assert [item.target_score for item in report.items] == [pytest.approx(expected, abs=PLANTED), 0.0]
    assert report.settings.contrast == "prob_diff"
    with pytest.raises(InvalidInputError, match="contrast must be one of"):
        audit(_planted(gpt2_tokenizer), PLANTED_ITEMS[:1], protected=["Paris"], contrast="ratio", **QUIET)
