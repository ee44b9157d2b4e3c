"""The batch engine: packed explain_batch equals one-by-one, is deterministic, and keeps failures and the model apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import ESTIMATOR_CONDITION, log_prob_magnitude, model_bound, to_float64

from fair_forge.explainability import AttributionExplainer, InvalidInputError, RawAttribution, register_method
from fair_forge.explainability.runtime.engine import Job, Rejected, run
from fair_forge.explainability.methods.registry import _REGISTRY, MethodContext, get_method
from fair_forge.explainability.text.prompt import build_model_input
from fair_forge.explainability.runtime.requests import MaskedRows
from fair_forge.explainability.runtime.scorer import TargetScorer
from fair_forge.explainability.text.segment import build_features
from fair_forge.explainability.core.types import Granularity

ITEMS = [
    ([{"role": "user", "content": "What is the capital of France?"}], "The capital of France is Paris."),
    ([{"role": "user", "content": "Why is the sky blue?"}], "Light scatters in the atmosphere."),
    ([{"role": "system", "content": "Answer in one short sentence."},
      {"role": "user", "content": "Name a friend of dogs."}], "Cats are friends!"),
    ([{"role": "user", "content": "The quick brown fox jumps over the lazy dog, why?"}], "Dogs are lazy."),
]
METHODS = {
    "occlusion": {},
    "lime": {"n_samples": 40},
    "kernel_shap": {"n_samples": 40},
    "sobol": {"n_samples": 8},
    "saliency": {},
    "input_x_gradient": {},
    "integrated_gradients": {"n_steps": 4},
    "smooth_grad": {"n_samples": 3},
    "square_grad": {"n_samples": 3},
    "var_grad": {"n_samples": 3},
    "gradient_shap": {"n_samples": 3},
}


class CallCounter:
    """Counts the model's forward calls and the rows and tokens they carry."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch = ids if ids is not None else kwargs["inputs_embeds"]
        self.calls.append((int(batch.shape[0]), int(batch.shape[1])))


def _explain(explainer, item, **params):
    """``explain`` for one batch item: (messages, target) or (prompt, target)."""
    source, target = item
    if isinstance(source, str):
        return explainer.explain(prompt=source, target=target, **params)
    return explainer.explain(source, target, **params)


def _input(tokenizer, item):
    source, target = item
    if isinstance(source, str):
        return build_model_input(tokenizer, prompt=source, target=target)
    return build_model_input(tokenizer, messages=source, target=target)


def _score_bound(model, tokenizer, item) -> float:
    """What rounding alone may move one item's explained score by between two layouts of its rows (padding,
    call-mates, threads): ``tolerances.model_bound`` of the sum of its target log-probs over its length."""
    model_input = _input(tokenizer, item)
    magnitude = log_prob_magnitude(model, model_input.input_ids)
    return model_bound(model, magnitude, length=model_input.length, terms=model_input.n_target)


def _rounding_bound(model, tokenizer, item) -> float:
    """The same for any method's attributions: a score's bound times what an estimator amplifies a score error by
    (``tolerances.ESTIMATOR_CONDITION``)."""
    return ESTIMATOR_CONDITION * _score_bound(model, tokenizer, item)


def _items(tokenizer):
    """Chat items, as raw prompts for a tokenizer without a chat template."""
    return ITEMS if tokenizer.chat_template else [(m[-1]["content"], t) for m, t in ITEMS]


@pytest.mark.filterwarnings("ignore::fair_forge.explainability.errors.ConvergenceWarning")
@pytest.mark.parametrize("per_target", [False, True])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_packed_batch_equals_one_by_one_with_fewer_model_calls(tiny_lm, method, per_target):
    """Padding and sharing calls leave every row's attention and positions as they were alone: an identity, checked in
    float64 (in float32 a Sobol index, a ratio of squared score differences to their variance, turns the last-bit
    changes of padding into 0.3% relative)."""
    model, tokenizer = tiny_lm
    to_float64(model)
    items = _items(tokenizer)
    explainer = AttributionExplainer(model, tokenizer)
    counter = CallCounter(model)
    try:
        single = [_explain(explainer, item, method=method, per_target=per_target, **METHODS[method])
                  for item in items]
        single_calls = len(counter.calls)
        batch = explainer.explain_batch(items, method=method, per_target=per_target, show_progress=False,
                                        **METHODS[method])
        packed_calls = len(counter.calls) - single_calls
    finally:
        counter.handle.remove()
    assert not batch.failures and batch.indices == list(range(len(items)))
    for item, one, packed in zip(items, single, batch):
        bound = _rounding_bound(model, tokenizer, item)
        np.testing.assert_allclose(packed.scores, one.scores, rtol=0, atol=bound)
        if per_target:
            np.testing.assert_allclose(packed.matrix.values, one.matrix.values, rtol=0, atol=bound)
        assert packed.metadata.n_backward_passes <= one.metadata.n_backward_passes
    assert packed_calls < single_calls  # rows of different items shared model calls


def test_a_packed_run_agrees_across_thread_counts(tiny_lm):
    """One and two threads split the model's sums differently (matrix products, attention): a packed float32 run
    agrees with itself to what float32 rounding allows, bounded from the computation, not seen on one machine."""
    model, tokenizer = tiny_lm
    items = _items(tokenizer)
    explainer = AttributionExplainer(model, tokenizer)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            runs.append(explainer.explain_batch(items, method="occlusion", per_target=True, show_progress=False))
    finally:
        torch.set_num_threads(threads)
    for item, one, two in zip(items, *runs):
        model_input = _input(tokenizer, item)
        magnitude = log_prob_magnitude(model, model_input.input_ids)
        # an occlusion score is the difference of two scores (sums of n_target log-probs), a cell of two log-probs
        score = 2 * model_bound(model, magnitude, length=model_input.length, terms=model_input.n_target)
        cell = 2 * model_bound(model, magnitude, length=model_input.length)
        np.testing.assert_allclose(two.scores, one.scores, rtol=0, atol=score)
        np.testing.assert_allclose(two.matrix.values, one.matrix.values, rtol=0, atol=cell)


@pytest.mark.parametrize("method", ["lime", "integrated_gradients", "smooth_grad"])
def test_a_rerun_is_bit_identical(tiny_gpt2, method):
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    runs = [explainer.explain_batch(ITEMS, method=method, per_target=True, show_progress=False, **METHODS[method])
            for _ in range(2)]
    for first, again in zip(*runs):
        assert first.scores == again.scores and first.matrix.values == again.matrix.values
        counts = ("n_forward_passes", "n_backward_passes", "n_tokens_processed")
        assert [getattr(first.metadata, c) for c in counts] == [getattr(again.metadata, c) for c in counts]


def test_an_interrupt_mid_batch_leaves_the_model_as_it_was(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    model.train()
    model.transformer.h[1].eval()
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    calls = []

    def interrupt(module, args, kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(interrupt, with_kwargs=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            AttributionExplainer(model, tokenizer).explain_batch(ITEMS, method="integrated_gradients", n_steps=4,
                                                                 show_progress=False)
    finally:
        handle.remove()
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags


def test_a_plain_function_method_works_inside_explain_batch(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    to_float64(model)  # the plain function runs its items alone, occlusion packs them: equal as an identity

    @register_method("only_first_kept", kind="perturbation", additive=False, defaults={"scale": 1.0})
    def only_first_kept(context):
        keep = np.ones((len(context.features) + 1, context.model_input.length), bool)
        for row, feature in enumerate(context.features, start=1):
            keep[row, list(feature.token_positions)] = False
        scores = context.scorer.score_token_masks(context.model_input, keep)
        return RawAttribution(feature_scores=context.params["scale"] * (scores[0] - scores[1:]))

    try:
        explainer = AttributionExplainer(model, tokenizer)
        batch = explainer.explain_batch(ITEMS, method="only_first_kept", scale=2.0, show_progress=False)
        occlusion = explainer.explain_batch(ITEMS, method="occlusion", show_progress=False)
    finally:
        del _REGISTRY["only_first_kept"]
    assert not batch.failures
    for item, custom, reference in zip(ITEMS, batch, occlusion):
        # twice a difference of two scores, each within a score's bound of the other layout's
        bound = 4 * _score_bound(model, tokenizer, item)
        np.testing.assert_allclose(custom.scores, 2.0 * np.asarray(reference.scores), rtol=0, atol=bound)
        assert custom.metadata.n_forward_passes >= 1


@pytest.mark.parametrize(("method", "params", "message"), [
    ("occlusion", {"stride": 3, "window": 2}, "never masked"),
    ("smooth_grad", {"noise_std": float("inf")}, "noise_std"),
    ("lime", {"kernel_width": float("nan")}, "kernel_width"),
    ("integrated_gradients", {"baseline": 10**6}, "vocabulary"),
    ("gradient_shap", {"seed": 2**64}, "seed"),
    ("kernel_shap", {"exact": "yes"}, "exact"),
    ("sobol", {"max_evaluations": 0}, "max_evaluations"),
])
def test_settings_errors_are_raised_once_before_any_model_call(tiny_gpt2, method, params, message):
    model, tokenizer = tiny_gpt2
    counter = CallCounter(model)
    try:
        with pytest.raises(InvalidInputError, match=message):
            AttributionExplainer(model, tokenizer).explain_batch(ITEMS, method=method, show_progress=False, **params)
        with pytest.raises(InvalidInputError, match=message):
            AttributionExplainer(model, tokenizer).iter_explain(iter(ITEMS), method=method, **params)
    finally:
        counter.handle.remove()
    assert counter.calls == []


def test_seed_none_is_allowed_and_fresh():
    assert get_method("lime").resolve_params({"seed": None})["seed"] is None
    with pytest.raises(InvalidInputError, match="seed"):
        get_method("smooth_grad").resolve_params({"seed": -1})


def test_a_shared_system_prompt_runs_once_for_the_whole_batch(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    explainer = AttributionExplainer(model, tokenizer)
    counter = CallCounter(model)
    try:
        explainer.explain_batch([ITEMS[0], ITEMS[1], ITEMS[3]], method="occlusion", show_progress=False)
    finally:
        counter.handle.remove()
    prefix_calls = [call for call in counter.calls if call[0] == 1]
    assert len(prefix_calls) == 1  # "<|im_start|>user\n" is the same prefix for all three items


def test_rows_per_call_follow_batch_size(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    counter = CallCounter(model)
    try:
        AttributionExplainer(model, tokenizer, batch_size=5).explain_batch(ITEMS, method="lime", n_samples=30,
                                                                           show_progress=False)
    finally:
        counter.handle.remove()
    assert max(rows for rows, _ in counter.calls) == 5


def test_remove_masking_packs_too(tiny_lm):
    model, tokenizer = tiny_lm
    to_float64(model)  # packed removed rows equal the rows alone: an identity
    items = _items(tokenizer)
    explainer = AttributionExplainer(model, tokenizer)
    batch = explainer.explain_batch(items, method="occlusion", remove=True, show_progress=False)
    for item, packed in zip(items, batch):
        one = _explain(explainer, item, method="occlusion", remove=True)
        bound = 2 * _score_bound(model, tokenizer, item)  # a difference of two scores
        np.testing.assert_allclose(packed.scores, one.scores, rtol=0, atol=bound)


def test_a_failing_item_is_recorded_and_the_others_still_pack(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    to_float64(model)  # the packed survivors equal their one-by-one results: an identity
    explainer = AttributionExplainer(model, tokenizer)
    long_item = ([{"role": "user", "content": "one two three four five six seven eight nine ten"}], "Numbers.")
    items = [ITEMS[0], long_item, ({"role": "user"},), ITEMS[1]]
    # exact KernelSHAP: 7 features need 128 evaluations, 10 features 1024 (over the budget: a BudgetError at run time)
    batch = explainer.explain_batch(items, method="kernel_shap", exact=True, max_evaluations=200, show_progress=False)
    assert batch.indices == [0, 3]
    assert [(f.index, f.error_type) for f in batch.failures] == [(1, "BudgetError"), (2, "InvalidInputError")]
    for index, result in zip(batch.indices, batch):
        one = _explain(explainer, items[index], method="kernel_shap", exact=True)
        bound = _rounding_bound(model, tokenizer, items[index])
        np.testing.assert_allclose(result.scores, one.scores, rtol=0, atol=bound)


def test_a_model_error_on_one_items_rows_fails_only_that_item(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    to_float64(model)  # the retried items equal their one-by-one results: an identity
    ids = [set(build_model_input(tokenizer, messages=m, target=t).input_ids.tolist()) for m, t in ITEMS]
    poisoned = min(ids[3] - ids[0] - ids[1] - ids[2])  # a token only the last item has

    def refuse(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and bool((ids == poisoned).any()):
            raise RuntimeError("this row breaks the model")

    explainer = AttributionExplainer(model, tokenizer)
    handle = model.register_forward_pre_hook(refuse, with_kwargs=True)
    try:
        batch = explainer.explain_batch(ITEMS, method="occlusion", show_progress=False)
    finally:
        handle.remove()
    assert batch.indices == [0, 1, 2]
    assert [(f.index, f.error_type) for f in batch.failures] == [(3, "RuntimeError")]
    for index, result in zip(batch.indices, batch):
        bound = 2 * _score_bound(model, tokenizer, ITEMS[index])  # a difference of two scores
        np.testing.assert_allclose(result.scores, _explain(explainer, ITEMS[index], method="occlusion").scores,
                                   rtol=0, atol=bound)


def test_the_model_is_untouched_after_a_packed_batch(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    AttributionExplainer(model, tokenizer).explain_batch(ITEMS, method="lime", n_samples=20, show_progress=False)
    assert model.training and all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_a_batch_whose_items_all_fail_validation_returns_only_failures(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    batch = AttributionExplainer(model, tokenizer).explain_batch(
        [("", "x"), {"question": "Why?", "answer": " "}], method="saliency", batch_size=2, show_progress=False)
    assert len(batch) == 0 and [f.index for f in batch.failures] == [0, 1]


def test_the_driver_keeps_a_bounded_window_and_passes_rejections_through(tiny_gpt2):
    """At most ``window`` plans are started before the first finishes; a rejected item comes back in order."""
    model, tokenizer = tiny_gpt2
    to_float64(model)  # a row packed with another item's equals it scored alone: an identity
    started: list[int] = []

    def plan(index, model_input):
        started.append(index)
        log_probs = yield MaskedRows(np.ones((1, model_input.length), bool), 0)
        return float(log_probs.sum())

    def jobs():
        for index, (messages, target) in enumerate(ITEMS):
            model_input = build_model_input(tokenizer, messages=messages, target=target)
            yield Job(index, model_input, TargetScorer(model), plan(index, model_input))
        yield Rejected(len(ITEMS), InvalidInputError("bad item"))

    finished = list(run(jobs(), window=2))
    assert [f.index for f in finished] == [0, 1, 2, 3, 4]
    assert started == [0, 1, 2, 3] and isinstance(finished[-1].error, InvalidInputError)
    for item in finished[:-1]:
        model_input = item.job.model_input
        direct = TargetScorer(model).score_token_masks(model_input, np.ones((1, model_input.length), bool))
        assert item.value == pytest.approx(float(direct[0]), abs=_score_bound(model, tokenizer, ITEMS[item.index]))


def test_spec_run_answers_a_plan_alone(tiny_gpt2):
    """A built-in plan driven by ``MethodSpec.run`` (no engine) gives the explainer's result."""
    model, tokenizer = tiny_gpt2
    model_input = build_model_input(tokenizer, messages=ITEMS[0][0], target=ITEMS[0][1])
    features = build_features(model_input, Granularity.WORD)
    spec = get_method("input_x_gradient")
    raw = spec.run(MethodContext(TargetScorer(model), model_input, features, spec.resolve_params({})))
    result = AttributionExplainer(model, tokenizer).explain(*ITEMS[0], method="input_x_gradient")
    assert list(raw.feature_scores) == result.scores  # the same calls in the same layout: the same bits
