"""fair-forge-explain: argument handling, exit codes, output; end to end on a tiny saved model and (integration) on
the embedded SmolLM2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fair_forge.explainability import cli
from fair_forge.explainability.cli import common as cli_common
from fair_forge.explainability import explainer as explainer_module
from fair_forge.explainability.errors import BudgetError, InvalidInputError, NonFiniteScoreError
from fair_forge.explainability.core.types import AttributionMethod, AttributionResult

TARGET = "The capital of France is Paris."
QUESTION = "What is the capital of France?"


def _stderr_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fair-forge-explain: error: ")
    return err


def _no_model(*_args: Any) -> Any:
    raise AssertionError("bad input must be rejected before the model is loaded")


# --- bad input: exit 2, one line, no model load ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],  # neither --prompt nor --messages
        ["--prompt", "q", "--messages", "m.json", "--target", "t"],
        ["--prompt", "q", "--target", "t", "--granularity", "paragraph"],
        ["--prompt", "q", "--target", "t", "--top", "-1"],
        ["--prompt", "q", "--target", "t", "--top", "many"],
    ],
)
def test_argument_errors_exit_2_with_one_line(argv: list[str], capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli_common, "load_model", _no_model)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    _stderr_line(capsys)


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "cannot read messages file"),
        ("{not json", "not valid JSON"),
        ('{"role": "user", "content": "hi"}', "non-empty list"),
        ("[]", "non-empty list"),
        ('[{"role": "user"}]', "item 0"),
        ('{"messages": [{"role": "user", "content": "hi"}], "target": 3}', "'target' must be a string"),
    ],
)
def test_bad_messages_file_exits_2(content, expected, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli_common, "load_model", _no_model)
    path = tmp_path / "messages.json"
    if content is not None:
        path.write_text(content)
    assert cli.main(["--messages", str(path), "--target", TARGET]) == 2
    assert expected in _stderr_line(capsys)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--prompt", QUESTION, "--target", "   "], "--target is empty"),
        (["--prompt", " ", "--target", TARGET], "--prompt is empty"),
        (["--prompt", QUESTION, "--target", TARGET, "--method", "no_such_method"], "available"),
        (["--prompt", QUESTION, "--target", TARGET, "--param", "n_steps"], "KEY=VALUE"),
    ],
)
def test_bad_values_exit_2_before_loading_the_model(argv, expected, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli_common, "load_model", _no_model)
    assert cli.main(argv) == 2
    assert expected in _stderr_line(capsys)


def test_missing_model_folder_exits_2(tmp_path: Path, capsys) -> None:
    assert cli.main(["--prompt", QUESTION, "--target", TARGET, "--model", str(tmp_path / "nope")]) == 2
    assert "no such folder" in _stderr_line(capsys)


def test_explainer_input_error_exits_2(saved_tiny_model: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "messages.json"
    path.write_text(json.dumps([{"role": "wizard", "content": QUESTION}]))
    assert cli.main(["--messages", str(path), "--target", TARGET, "--model", str(saved_tiny_model)]) == 2
    _stderr_line(capsys)


# --- what is sent to the explainer ----------------------------------------------------------------------------------


class _RecordingExplainer:
    """Stands in for AttributionExplainer: records the call, returns a canned result."""

    calls: list[dict[str, Any]] = []

    def __init__(self, model: Any, tokenizer: Any, model_name: str = "unknown") -> None:
        self.model_name = model_name

    def explain(self, **kwargs: Any) -> AttributionResult:
        type(self).calls.append(kwargs)
        if kwargs.get("method") == "explode":
            raise InvalidInputError("the explainer rejected this input")
        words = ["What", "capital", "France"]
        scores = [0.5, -2.0, 1.0]
        return AttributionResult.model_validate(
            {
                "prompt": QUESTION,
                "target": kwargs["target"],
                "method": "integrated_gradients",
                "granularity": kwargs["granularity"],
                "model_name": self.model_name,
                "attributions": [
                    {"text": w, "score": s, "position": i, "normalized_score": s / 2.0}
                    for i, (w, s) in enumerate(zip(words, scores))
                ],
                "metadata": {"compute_time_seconds": 0.25, "n_forward_passes": 2, "n_backward_passes": 1},
            }
        )


class _ChatTokenizer:
    chat_template = "{{ messages }}"


class _PlainTokenizer:
    chat_template = None


@pytest.fixture
def recording(monkeypatch) -> type[_RecordingExplainer]:
    _RecordingExplainer.calls = []
    monkeypatch.setattr(explainer_module, "AttributionExplainer", _RecordingExplainer)
    monkeypatch.setattr(cli_common, "check_method", lambda method: None)
    monkeypatch.setattr(cli_common, "load_model", lambda path: (object(), _ChatTokenizer(), "fake-model"))
    return _RecordingExplainer


def test_prompt_goes_through_the_chat_template_as_a_user_message(recording, capsys) -> None:
    argv = ["--prompt", QUESTION, "--target", TARGET, "--granularity", "sentence", "--param", "n_steps=8"]
    assert cli.main(argv) == 0
    (call,) = recording.calls
    assert call["messages"] == [{"role": "user", "content": QUESTION}]
    assert "prompt" not in call and "method" not in call  # the explainer's default method applies
    assert call["granularity"] == "sentence" and call["n_steps"] == 8


def test_raw_prompt_and_template_less_tokenizers_send_plain_text(recording, monkeypatch) -> None:
    assert cli.main(["--prompt", QUESTION, "--target", TARGET, "--raw"]) == 0
    monkeypatch.setattr(cli_common, "load_model", lambda path: (object(), _PlainTokenizer(), "fake-model"))
    assert cli.main(["--prompt", QUESTION, "--target", TARGET]) == 0
    assert [call["prompt"] for call in recording.calls] == [QUESTION, QUESTION]


def test_messages_file_may_carry_the_target(recording, tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps({"messages": messages, "target": TARGET}))
    assert cli.main(["--messages", str(path), "--method", "occlusion"]) == 0
    (call,) = recording.calls
    assert call["messages"] == messages and call["target"] == TARGET and call["method"] == "occlusion"


def test_table_lists_top_k_by_absolute_score(recording, capsys) -> None:
    assert cli.main(["--prompt", QUESTION, "--target", TARGET, "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "model: fake-model" in out and "integrated_gradients" in out and "0.25 s" in out
    rows = out[out.index("rank") :].splitlines()[1:]
    assert [row.split()[:2] for row in rows] == [["1", "capital"], ["2", "France"]]
    assert "-2.0000" in rows[0] and "-1.000" in rows[0]


def test_json_output_round_trips(recording, tmp_path: Path, capsys) -> None:
    out_path = tmp_path / "result.json"
    assert cli.main(["--prompt", QUESTION, "--target", TARGET, "--json", str(out_path)]) == 0
    result = AttributionResult.model_validate_json(out_path.read_text())
    assert result.model_name == "fake-model" and len(result.attributions) == 3
    assert "full result written to" in capsys.readouterr().out
    assert cli.main(["--prompt", QUESTION, "--target", TARGET, "--json", "-"]) == 0
    assert AttributionResult.model_validate_json(capsys.readouterr().out) == result  # JSON only, no table


def test_input_error_from_the_explainer_exits_2(recording, capsys) -> None:
    assert cli.main(["--prompt", QUESTION, "--target", TARGET, "--method", "explode"]) == 2
    assert "rejected" in _stderr_line(capsys)


# --- end to end ---------------------------------------------------------------------------------------------------


def test_end_to_end_on_a_local_model_folder(saved_tiny_model: Path, tmp_path: Path, capsys) -> None:
    out_path = tmp_path / "result.json"
    argv = ["--prompt", QUESTION, "--target", TARGET, "--model", str(saved_tiny_model), "--method", "input_x_gradient"]
    assert cli.main([*argv, "--json", str(out_path), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "input_x_gradient" in out and "top 3 of" in out
    result = AttributionResult.model_validate_json(out_path.read_text())
    assert result.model_name == "tiny-gpt2"
    assert str(result.method) == "input_x_gradient"
    assert {a.text for a in result.attributions} >= {"capital", "France"}


@pytest.mark.integration
def test_end_to_end_on_the_embedded_model(capsys) -> None:
    argv = ["--prompt", QUESTION, "--target", TARGET, "--method", "saliency", "--top", "3", "--json", "-"]
    assert cli.main(argv) == 0
    result = AttributionResult.model_validate_json(capsys.readouterr().out)
    assert result.model_name.startswith("SmolLM2-135M-Instruct")
    assert {"What", "capital", "France"} <= {a.text for a in result.attributions}
    assert {a.text for a in result.get_top_k(3)} & {"capital", "France"}


# --- hardening: lazy start, typed errors everywhere, output path checked first --------------------------------------


def test_help_lists_the_methods_without_importing_torch() -> None:
    script = (
        "import sys\n"
        "from fair_forge.explainability import cli\n"
        "print(cli.build_parser().format_help())\n"
        "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    help_text, imported = run.stdout.rsplit("\n", 2)[0], run.stdout.rsplit("\n", 2)[1]
    assert imported == "[]"
    listed = " ".join(help_text[help_text.index("methods:") :].split())
    assert all(method.value in listed for method in AttributionMethod if method.value != "integrated_jacobians")


@pytest.mark.parametrize(
    "argv", [["--prompt", "caf\udce9?", "--target", TARGET], ["--prompt", QUESTION, "--target", "\ud800"]]
)
def test_lone_surrogates_exit_2_before_loading_the_model(argv, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli_common, "load_model", _no_model)
    assert cli.main(argv) == 2
    assert "lone surrogate" in _stderr_line(capsys)


def test_lone_surrogate_in_a_messages_file_exits_2(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli_common, "load_model", _no_model)
    path = tmp_path / "chat.json"
    path.write_text('[{"role": "user", "content": "bad \\ud800 text"}]', encoding="utf-8")
    assert cli.main(["--messages", str(path), "--target", TARGET]) == 2
    assert "message 0" in _stderr_line(capsys)


@pytest.mark.parametrize("where", ["missing/out.json", "folder", "readonly/out.json"])
def test_unwritable_json_path_exits_2_before_loading_the_model(where, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli_common, "load_model", _no_model)
    (tmp_path / "folder").mkdir()
    (tmp_path / "readonly").mkdir(mode=0o500)
    if where.startswith("readonly") and os.access(tmp_path / "readonly", os.W_OK):
        pytest.skip("running as a user who may write anywhere (root)")
    assert cli.main(["--prompt", QUESTION, "--target", TARGET, "--json", str(tmp_path / where)]) == 2
    assert "--json" in _stderr_line(capsys)


@pytest.mark.parametrize(
    ("error", "code"),
    [(BudgetError("n_steps=1000000000 needs too many evaluations"), 2),
     (InvalidInputError("baseline 99999999 is not a token id"), 2),
     (NonFiniteScoreError("feature 1 ('x') has score nan"), 1),
     (MemoryError(), 1)],
)
def test_every_typed_error_and_memory_error_is_one_line(error, code, recording, monkeypatch, capsys) -> None:
    def explain(self, **kwargs):
        raise error

    monkeypatch.setattr(recording, "explain", explain)
    assert cli.main(["--prompt", QUESTION, "--target", TARGET, "--param", "n_steps=1000000000"]) == code
    _stderr_line(capsys)


def test_chat_template_raising_an_exception_exits_2(saved_tiny_model: Path, capsys) -> None:
    config = saved_tiny_model / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings["chat_template"] = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    config.write_text(json.dumps(settings))
    (saved_tiny_model / "chat_template.jinja").unlink(missing_ok=True)
    assert cli.main(["--prompt", QUESTION, "--target", TARGET, "--model", str(saved_tiny_model)]) == 2
    assert "chat template rejected" in _stderr_line(capsys)
