"""The server's GlobalModel and the random-subset baseline: architecture, streams, budget, labels."""

from __future__ import annotations

import time

import torch

from fedistill.data import SyntheticSet
from fedistill.federated.server import GlobalModel, random_baseline
from fedistill.models import build_model
from fedistill.training import EvalRecipe, ModelSpec, random_subset

SPEC = ModelSpec("convnet", {"width": 8, "depth": 2})
RECIPE = EvalRecipe(epochs=2, max_steps=3, batch_size=32, dsa=False, lr_decay=False)
CPU = torch.device("cpu")


def _model(digits, **kwargs) -> GlobalModel:
    return GlobalModel(SPEC, digits, recipe=kwargs.pop("recipe", RECIPE), device=CPU, seed=5, **kwargs)


def _set(digits, n: int = 40) -> SyntheticSet:
    return SyntheticSet(digits.train.images[:n], digits.train.labels[:n], digits.info)


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_global_model_has_the_specs_architecture_and_a_seeded_init(digits):
    m = _model(digits)
    ref = build_model("convnet", digits.info, seed=0, width=8, depth=2).state_dict()
    assert {k: v.shape for k, v in m.state.items()} == {k: v.shape for k, v in ref.items()}
    assert _same(m.state, _model(digits).state)  # the same seed, the same initial weights
    other = GlobalModel(SPEC, digits, recipe=RECIPE, device=CPU, seed=6)
    assert not _same(m.state, other.state)


def test_rounds_continue_from_the_weights_by_default_and_draw_their_own_stream(digits):
    syn = _set(digits)
    start = time.perf_counter()
    cont = _model(digits)
    seconds = cont.train_on(syn, round_=1)
    assert 0 < seconds <= time.perf_counter() - start
    after_one = dict(cont.state)
    cont.train_on(syn, round_=2)
    fresh = _model(digits, continue_training=False)
    fresh.train_on(syn, round_=2)
    assert not _same(cont.state, fresh.state)  # round 2 went on from round 1's weights
    assert not _same(after_one, cont.state)
    again, twice = _model(digits, continue_training=False), _model(digits, continue_training=False)
    again.train_on(syn, round_=1)
    twice.train_on(syn, round_=1)
    assert _same(again.state, twice.state)  # a round's stream is fixed by the seed and the round
    assert not _same(again.state, fresh.state)  # round 1 and round 2 draw different streams


def test_soft_labels_are_the_training_targets_when_present(digits):
    syn = _set(digits)
    soft = torch.nn.functional.one_hot((syn.labels + 1) % 10, 10).float()  # every row says the next class
    hard, relabelled = _model(digits), _model(digits)
    hard.train_on(syn, round_=1)
    relabelled.train_on(SyntheticSet(syn.images, syn.labels, digits.info, soft), round_=1)
    assert not _same(hard.state, relabelled.state)


def test_random_baseline_is_a_fresh_model_on_a_class_matched_real_subset_with_the_whole_budget(digits):
    labels = torch.arange(10).repeat(2)
    model = _model(digits)
    model.train_on(_set(digits), round_=1)  # the baseline never starts from the global weights
    out = random_baseline(model, labels, rounds=3)
    assert (out["images"], out["epochs"], out["max_steps"]) == (20, 6, 9)
    budget = EvalRecipe(**{**RECIPE.__dict__, "epochs": 6, "max_steps": 9})
    ref = GlobalModel(SPEC, digits, recipe=budget, device=CPU, seed=5, continue_training=False)
    real = random_subset(digits.train, labels, seed=5)
    ref.train_on(SyntheticSet(real.images, real.labels, digits.info), round_=0)
    assert out["accuracy"] == round(100 * ref.evaluate()[0], 4)
    once = random_baseline(model, labels)
    assert (once["epochs"], once["max_steps"]) == (2, 3)
    uncapped = random_baseline(_model(digits, recipe=EvalRecipe(**{**RECIPE.__dict__, "max_steps": None})), labels)
    assert uncapped["max_steps"] is None and uncapped["epochs"] == 2
