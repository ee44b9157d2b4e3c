"""Attention weights read during one forward pass (runtime/attention.py) against the model's own eager weights.

The oracle is ``output_attentions=True`` on an eager copy of the same model (same weights): the rows read while the
model runs its own implementation (sdpa for every zoo model) must equal the eager copy's rows to 1e-5, on every
architecture of tests/zoo.py, and on tiny Gemma 2 (logit softcapping) and gpt-oss (attention sinks) models.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_utils import AttentionInterface
from zoo import ARCHITECTURES, ZooModel, build_zoo_model

from fair_forge.explainability.errors import InvalidInputError, UnsupportedModelError
from fair_forge.explainability.runtime.attention import capture_bytes, query_rows, read_attention
from fair_forge.explainability.runtime.memory import call_estimate
from fair_forge.explainability.text.prompt import ModelInput, build_model_input

TOLERANCE = 1e-5
ORIGINAL_LOOKUP = AttentionInterface.get_interface


def eager_rows(model, input_ids: torch.Tensor, rows, attention_mask=None) -> torch.Tensor:
    """(layers, heads, rows, n) from ``output_attentions=True`` on an eager copy of ``model``: the oracle."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.reshape(1, -1)}
    with torch.no_grad():
        output = eager(input_ids=input_ids.reshape(1, -1), output_attentions=True, use_cache=False, **kwargs)
    return torch.stack([layer[0][:, list(rows)] for layer in output.attentions]).float()


def zoo_input(zoo_model: ZooModel, index: int = 0) -> ModelInput:
    inputs = zoo_model.inputs(index)
    return build_model_input(zoo_model.tokenizer, target=inputs["target"], messages=inputs.get("messages"),
                             prompt=inputs.get("prompt"))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def zoo_model(request: pytest.FixtureRequest) -> ZooModel:
    return build_zoo_model(request.param)


@pytest.mark.parametrize("rows", ["predicting", "target"])
def test_rows_read_under_sdpa_equal_the_eager_weights(zoo_model: ZooModel, rows: str) -> None:
    model = zoo_model.model
    assert model.config._attn_implementation == "sdpa"
    model_input = zoo_input(zoo_model)
    positions = query_rows(model_input, rows)
    captured = read_attention(model, model_input.input_ids, positions)
    expected = eager_rows(model, model_input.input_ids, positions)
    assert captured.shape == expected.shape == (2, 4, model_input.n_target, model_input.length)
    torch.testing.assert_close(captured, expected, rtol=0, atol=TOLERANCE)
    # the model is as it was: its implementation, and transformers' lookup
    assert model.config._attn_implementation == "sdpa"
    assert AttentionInterface.get_interface is ORIGINAL_LOOKUP


def test_predicting_rows_end_one_before_the_target(zoo_model: ZooModel) -> None:
    model_input = zoo_input(zoo_model)
    predicting, target = query_rows(model_input, "predicting"), query_rows(model_input, "target")
    assert predicting[0] == model_input.target_start - 1 and predicting[-1] == model_input.length - 2
    assert list(target) == list(range(model_input.target_start, model_input.length))


@pytest.mark.parametrize("name", ["llama", "gemma3"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_padding_masks_and_eager_models_are_read_as_they_run(name: str, implementation: str) -> None:
    model = build_zoo_model(name).model
    model.set_attn_implementation(implementation)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(10, model.config.vocab_size, (24,), generator=generator)
    mask = torch.ones(24, dtype=torch.long)
    mask[:3] = 0  # left padding, as in a packed call
    rows = list(range(12, 24))  # past gemma3's window of 8
    torch.testing.assert_close(read_attention(model, ids, rows, attention_mask=mask),
                               eager_rows(model, ids, rows, attention_mask=mask), rtol=0, atol=TOLERANCE)
    assert model.config._attn_implementation == implementation


def _tiny(config_class, **extra):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = config_class(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                              **extra)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        for module in model.modules():  # gpt-oss initialises its sinks to zero: make them matter
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                module.sinks.data.normal_(0, 2)
    return model


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_softcapping_and_attention_sinks_are_part_of_the_weights(family: str) -> None:
    model = (_tiny(transformers.Gemma2Config, sliding_window=6, attn_logit_softcapping=2.0, query_pre_attn_scalar=8)
             if family == "gemma2" else
             _tiny(transformers.GptOssConfig, sliding_window=6, num_local_experts=4, num_experts_per_tok=2,
                   layer_types=["sliding_attention", "full_attention"], rope_parameters={"rope_type": "default",
                                                                                         "rope_theta": 10000.0}))
    ids = torch.arange(3, 23)
    rows = list(range(5, 19))
    torch.testing.assert_close(read_attention(model, ids, rows), eager_rows(model, ids, rows), rtol=0, atol=TOLERANCE)


def test_columns_sum_each_rows_weights_into_features(tiny_llama) -> None:
    model, _ = tiny_llama
    ids = torch.arange(5, 25)
    membership = torch.zeros(20, 3)
    membership[2:6, 0] = membership[6:7, 1] = membership[9:15, 2] = 1
    full = read_attention(model, ids, [15, 16, 18])
    torch.testing.assert_close(read_attention(model, ids, [15, 16, 18], columns=membership), full @ membership)


def test_other_models_run_untouched_while_one_is_read(tiny_llama, tiny_gpt2) -> None:
    """Only the borrowed model's attention calls are recorded; the lookup is restored after an error too."""
    model, other = tiny_llama[0], tiny_gpt2[0]
    ids = torch.arange(5, 15)
    with torch.no_grad():
        before = other(input_ids=ids[None]).logits

    def forward_and_fail(*args, **kwargs):
        with torch.no_grad():
            assert torch.equal(other(input_ids=ids[None]).logits, before)
        raise RuntimeError("boom")

    handle = model.lm_head.register_forward_hook(forward_and_fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            read_attention(model, ids, [8])
    finally:
        handle.remove()
    assert AttentionInterface.get_interface is ORIGINAL_LOOKUP
    assert read_attention(model, ids, [8]).shape[-1] == 10


def test_models_that_bypass_the_attention_interface_are_refused() -> None:
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, reorder_and_upcast_attn=True, attn_implementation="eager"))
    with pytest.raises(UnsupportedModelError, match="0 attention calls"):
        read_attention(gpt2.eval(), torch.arange(10), [5])
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="ALiBi"):
        read_attention(bloom.eval(), torch.arange(10), [5])


def test_bad_rows_and_columns_are_refused_before_the_model_runs(tiny_llama) -> None:
    model, _ = tiny_llama
    for rows in ([], [10], [-1]):
        with pytest.raises(InvalidInputError, match="rows"):
            read_attention(model, torch.arange(10), rows)
    with pytest.raises(InvalidInputError, match="columns"):
        read_attention(model, torch.arange(10), [3], columns=torch.ones(9, 2))


def test_8k_tokens_hold_no_full_attention_map() -> None:
    """At 8192 tokens the capture holds the kept rows and one layer's temporaries, not an n x n map (which would be
    heads x n x n x 4 bytes = 1 GiB per layer here): its peak stays within the forward pass's estimate plus the
    capture's own bytes (measured: 11 MB against a 268 MB estimate, which counts a float mask sdpa does not build
    here), less than a quarter of one head's map."""
    from test_memory import measured_peak

    length, n_rows = 8192, 16
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 100, (length,), generator=torch.Generator().manual_seed(0))
    rows = np.arange(length - n_rows - 1, length - 1)
    membership = torch.zeros(length, 8)
    membership[torch.arange(length), torch.arange(length) % 8] = 1
    result: list[torch.Tensor] = []
    peak = measured_peak(lambda: result.append(read_attention(model, ids, rows, columns=membership)))
    assert result[0].shape == (2, 4, n_rows, 8)
    assert torch.allclose(result[0].sum(-1), torch.ones(2, 4, n_rows))  # every row's weights, all of them
    bound = call_estimate(model, length=length, n_target=1, grad=False).bytes_per_row + \
        capture_bytes(model, length, n_rows, 8)
    assert peak <= bound and peak < length * length
