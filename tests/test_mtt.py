"""Trajectory matching (MTT, TESLA): exact TESLA gradient, memory, expert cache, step size, accuracy."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import pytest
import torch
from claims import SEEDS, assert_beats, margins

from fedistill.augment import DSA
from fedistill.engines import ENGINES, build_engine
from fedistill.engines import experts as experts_module
from fedistill.engines import mtt as mtt_module
from fedistill.engines.mtt import FlatModel, expert_trajectories, plan_steps, tesla_backward, unrolled_loss
from fedistill.evaluation import EvalRecipe, ModelSpec, evaluate_synthetic
from fedistill.models import build_model
from fedistill.softlabel import resolve_teacher

NET = {"width": 32, "depth": 2}
EXPERTS = {"num_experts": 3, "expert_train_epochs": 10, "expert_batch": 32, "max_start_epoch": 4, "model_kwargs": NET}
FAST = EXPERTS | {"iterations": 60, "syn_steps": 10, "lr_img": 100.0, "lr_lr": 1e-7, "log_every": 10}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One expert cache for the module, so the buffer is trained once."""
    return str(tmp_path_factory.mktemp("experts"))


def _tiny_problem(digits, dtype=torch.float64, n=20):
    net = build_model("convnet", digits.info, seed=0, width=4, depth=2).to(dtype)
    model = FlatModel(net)
    g = torch.Generator().manual_seed(0)
    start = model.vector()
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=dtype)
    return model, digits.train.images[:n].to(dtype), digits.train.labels[:n], start, target, g


def test_registered():
    assert {"mtt", "tesla"} <= set(ENGINES.names())
    assert build_engine("tesla").config.soft_labels and not build_engine("mtt").config.soft_labels


@pytest.mark.parametrize("soft", [False, True])
def test_tesla_gradient_equals_unrolled_gradient(digits, soft):
    """Same loss and gradients (images, step size, learnable soft labels) as full unrolling, float64."""
    model, images, labels, start, target, g = _tiny_problem(digits)
    dsa = DSA()
    plan = plan_steps(len(images), 6, 8, dsa=dsa, generator=g, image_size=digits.info.image_size)
    out = []
    for fn in ("unrolled", "tesla"):
        syn = images.clone().requires_grad_(True)
        lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        targets = torch.nn.functional.one_hot(labels, 10).to(torch.float64) * 0.8 + 0.02 if soft else labels
        if soft:
            targets.requires_grad_(True)
        if fn == "unrolled":
            loss = unrolled_loss(model, syn, targets, lr, start, target, plan, dsa=dsa)
            loss.backward()
            value = float(loss.detach())
        else:
            value = float(tesla_backward(model, syn, targets, lr, start, target, plan, dsa=dsa))
        out.append((value, syn.grad, lr.grad, targets.grad if soft else None))
    (v0, s0, l0, t0), (v1, s1, l1, t1) = out
    assert v0 == pytest.approx(v1, rel=1e-12)
    assert s0.abs().max() > 0 and torch.allclose(s0, s1, rtol=1e-9, atol=1e-12)
    assert torch.allclose(l0, l1, rtol=1e-9, atol=1e-12)
    if soft:
        assert torch.allclose(t0, t1, rtol=1e-9, atol=1e-12)


class _Box:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


def saved_tensor_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors autograd keeps alive for backward while ``fn`` runs (CPU-measurable)."""
    state = {"live": 0, "peak": 0}

    def free(n: int) -> None:
        state["live"] -= n

    def pack(t: torch.Tensor) -> _Box:
        n = t.numel() * t.element_size()
        state["live"] += n
        state["peak"] = max(state["peak"], state["live"])
        box = _Box(t)
        weakref.finalize(box, free, n)
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        fn()
    return state["peak"]


def test_memory_grows_with_steps_for_mtt_not_tesla(digits):
    """Measured: x4.0 for MTT and x1.09 for TESLA from 4 to 16 steps."""
    model, images, labels, start, target, _ = _tiny_problem(digits, torch.float32, n=200)

    def run(kind: str, steps: int) -> None:
        plan = plan_steps(
            len(images), steps, None, dsa=None, generator=torch.Generator().manual_seed(0), image_size=(8, 8)
        )
        syn, lr = images.clone().requires_grad_(True), torch.tensor(0.01, requires_grad=True)
        if kind == "mtt":
            unrolled_loss(model, syn, labels, lr, start, target, plan).backward()
        else:
            tesla_backward(model, syn, labels, lr, start, target, plan)

    mtt = saved_tensor_peak(lambda: run("mtt", 16)) / saved_tensor_peak(lambda: run("mtt", 4))
    tesla = saved_tensor_peak(lambda: run("tesla", 16)) / saved_tensor_peak(lambda: run("tesla", 4))
    assert mtt > 3.0 and tesla < 1.3, (mtt, tesla)


def test_expert_buffer_round_trip_and_cache_hit(digits, tmp_path, monkeypatch):
    cfg = mtt_module.MTTConfig(**EXPERTS | {"num_experts": 2, "expert_train_epochs": 2, "cache_dir": str(tmp_path)})
    first = expert_trajectories(digits.train, cfg, seed=0, device=torch.device("cpu"))
    files = list(tmp_path.glob("experts-*.safetensors"))
    assert len(files) == 1 and sorted(first) == ["expert_0", "expert_1"]
    net = build_model("convnet", digits.info, **NET)
    assert first["expert_0"].shape == (3, sum(p.numel() for p in net.parameters()))
    assert not torch.equal(first["expert_0"][0], first["expert_0"][-1])  # it trained

    def boom(*args, **kwargs):
        raise AssertionError("experts retrained despite the cache")

    monkeypatch.setattr(experts_module, "train_epochs", boom)
    again = expert_trajectories(digits.train, cfg, seed=0, device=torch.device("cpu"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(AssertionError, match="retrained"):  # other data -> other key -> rebuild
        expert_trajectories(digits.train.subset(torch.arange(300)), cfg, seed=0, device=torch.device("cpu"))


def test_step_size_stays_positive(digits, cache):
    """A step-size lr so large that plain SGD would drive the step size negative: it is floored."""
    cfg = FAST | {"iterations": 4, "lr_lr": 1e-1, "log_every": 1, "cache_dir": cache}
    syn = build_engine("mtt", **cfg).distill(digits.train, 1, seed=0)
    lrs = [h["lr"] for h in syn.metadata["loss_history"]]
    assert min(lrs) == pytest.approx(1e-5) and all(v > 0 for v in lrs), lrs


def test_tesla_soft_labels_from_expert(digits, cache):
    syn = build_engine("tesla", **FAST | {"iterations": 2, "cache_dir": cache}).distill(digits.train, 2, seed=0)
    assert syn.soft_labels is not None and syn.soft_labels.shape == (20, 10)
    assert torch.allclose(syn.soft_labels.sum(1), torch.ones(20), atol=1e-5)
    assert (syn.soft_labels.argmax(1) == syn.labels).float().mean() > 0.7
    syn.validate(digits.info)


def test_tesla_records_its_expert_as_the_teacher_of_its_soft_labels(digits, cache):
    """The set's ``teacher`` record reloads expert 0's final parameters (what labelled the images), so
    evaluation relabels the random subset with the same expert; MTT (hard labels) records none."""
    cpu = torch.device("cpu")
    engine = build_engine("tesla", **FAST | {"iterations": 2, "cache_dir": cache})
    syn = engine.distill(digits.train, 1, seed=0)
    temperature = engine.config.label_temperature
    assert syn.metadata["teacher"]["source"] == "expert" and syn.metadata["teacher"]["temperature"] == temperature
    teacher = resolve_teacher(syn, digits, device=cpu)
    assert teacher.cached  # the engine's own expert buffer, not a retrained network
    assert syn.metadata["teacher"]["key"] == teacher.key  # the same record Teacher.metadata writes
    final = expert_trajectories(digits.train, engine.config, seed=0, device=cpu)["expert_0"][-1]
    flat = FlatModel(build_model("convnet", digits.info, **NET))
    x = digits.test.images[:64]
    expected = torch.softmax(flat(final, x) / temperature, dim=1)
    torch.testing.assert_close(teacher.soft_labels(x, temperature=temperature), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="trained on other data"):
        resolve_teacher(syn, type(digits)(digits.info, digits.test, digits.val, digits.test), device=cpu)
    res = evaluate_synthetic(syn, digits, models=[ModelSpec("convnet", NET)], recipe=EvalRecipe(epochs=3), seed=0)
    assert "random_subset_soft" in res["baselines"] and res["teacher"]["epochs"] == EXPERTS["expert_train_epochs"]
    mtt = build_engine("mtt", **FAST | {"iterations": 2, "cache_dir": cache}).distill(digits.train, 1, seed=0)
    assert "teacher" not in mtt.metadata


#: TESLA at IPC 1 needs a longer run than MTT to beat random images on every seed: at MTT's 60
#: iterations of 10 steps its margins over the random subset on seeds 0-2 were 5.3, -6.7 and 6.1.
TESLA = {"iterations": 120, "syn_steps": 20}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mtt", "tesla"])
def test_beats_random_subset_at_ipc1(digits, cache, method):
    """IPC 1 on digits, margins over seeds 0-2 (``tests/claims.py``). Measured on the dev machine: MTT
    (60 iterations) 18.7, 13.7, 13.4 points over the random subset. TESLA (120 iterations of 20 steps,
    soft labels) 9.2, 1.7, 7.0, and 18.1, 4.2, 2.8 over the same random subsets labelled by the expert
    the set records as its teacher at the same temperature (a weak expert's labels do not carry TESLA's
    result). TESLA's claim is the weaker one (every seed above, not a significant mean): its margins
    vary too much for 3 seeds, and on 5 seeds (9.2, 1.7, 7.0, 8.9, 9.2 and 18.1, 4.2, 2.8, 6.1, 7.5:
    95% lower bounds 4.1 and 2.0 points) the test took 110 s, ~19 s per distillation. Its gradient is
    MTT's (``test_tesla_gradient_equals_unrolled_gradient``), whose claim is significant."""
    tesla = method == "tesla"
    engine = build_engine(method, **FAST | {"cache_dir": cache} | (TESLA if tesla else {}))
    sets = {seed: engine.distill(digits.train, 1, seed=seed) for seed in SEEDS}  # the experts are shared
    spec, recipe = ModelSpec("convnet", NET), EvalRecipe(epochs=100)
    gains = margins(sets.__getitem__, digits, spec=spec, recipe=recipe)
    assert_beats(gains, floor=3.0 if tesla else 6.0, what=f"{method} vs random subset", significant=not tesla)
    if tesla:  # the random subset relabelled by the expert the set records as its teacher
        soft = margins(sets.__getitem__, digits, spec=spec, recipe=recipe, baseline="random_subset_soft")
        assert_beats(soft, floor=3.0, what="tesla vs expert-relabelled random subset", significant=False)
