"""Distribution matching: objective decreases, determinism, init, missing classes, bf16, accuracy."""

from __future__ import annotations

import pytest
import torch
from claims import assert_beats, margins

from fedistill.data import Split
from fedistill.engines import ENGINES, build_engine
from fedistill.engines.matching import RealSampler, real_class_means
from fedistill.evaluation import EvalRecipe, ModelSpec
from fedistill.models import build_model
from fedistill.seeding import torch_generator

# a short run: lr_img 10 moves 8x8 images further per step than the reference lr of 1
FAST = {"iterations": 40, "batch_real": 64, "lr_img": 10.0, "model_kwargs": {"width": 32}, "log_every": 5}


def dm_objective(data: Split, images: torch.Tensor, labels: torch.Tensor, *, nets: int = 8) -> float:
    """The DM objective (no augmentation) averaged over fixed random networks and all real data."""
    classes = sorted(set(labels.tolist()))
    ipc = len(labels) // len(classes)
    total = 0.0
    for k in range(nets):
        net = build_model("convnet", data.info, seed=1000 + k, width=32).requires_grad_(False)
        sampler = RealSampler(data, classes, 10_000, torch.device("cpu"), torch_generator(0, "t"))
        real = real_class_means(
            net.embed, sampler.sample(), sampler.groups, sampler.counts, dsa=None, params=None, chunk=512
        )
        syn = net.embed(images).view(len(classes), ipc, -1).mean(1)
        total += float(((real - syn) ** 2).sum())
    return total / nets


def test_dm_registered():
    assert "dm" in ENGINES


@pytest.mark.parametrize(("init", "factor"), [("real", 0.8), ("noise", 0.92)])
def test_dm_objective_decreases(digits, init, factor):
    """200 iterations cut the DM objective on held-out random networks (measured: x0.68 real, x0.85 noise)."""
    from fedistill.engines.base import init_synthetic

    start, labels = init_synthetic(digits.train, 5, init=init, seed=0)
    syn = build_engine("dm", **FAST | {"iterations": 200}).distill(digits.train, 5, init=init, seed=0)
    assert torch.equal(syn.labels, labels)
    before, after = dm_objective(digits.train, start, labels), dm_objective(digits.train, syn.images, labels)
    assert after < factor * before, (before, after)
    assert syn.images.isfinite().all()


def test_noise_init_uses_no_real_image(digits):
    from fedistill.engines.base import init_synthetic

    images, _ = init_synthetic(digits.train, 3, init="noise", seed=0)
    dists = torch.cdist(images.flatten(1), digits.train.images.flatten(1))
    assert dists.min() > 1.0


@pytest.mark.parametrize(("real_per_image", "rows"), [(2, [5, 5, 4, 1]), (10, [5, 3, 1, 1])])
def test_small_classes_get_one_synthetic_image_per_real_per_image(digits, real_per_image, rows):
    """A class of n real samples gets min(ipc, max(1, n // real_per_image)) images, unpadded, each a real
    image of its class at init; the reference's padding (pad_small=True) gives every class ipc rows."""
    from fedistill.engines.base import init_synthetic

    picked = []
    for c, n in enumerate((60, 35, 9, 1)):
        picked += torch.nonzero(digits.train.labels == c).flatten()[:n].tolist()
    data = digits.train.subset(torch.tensor(picked))
    images, labels = init_synthetic(data, 5, init="real", seed=0, pad_small=False, real_per_image=real_per_image)
    assert torch.bincount(labels, minlength=10)[:4].tolist() == rows and len(labels) == sum(rows)
    for image, label in zip(images, labels, strict=True):  # a verbatim copy of a real image of its class
        same = data.images[data.labels == label]
        assert (same == image).flatten(1).all(1).any()
    _, padded = init_synthetic(data, 5, init="real", seed=0, pad_small=True, real_per_image=real_per_image)
    assert torch.bincount(padded, minlength=10)[:4].tolist() == [5, 5, 5, 5]


def test_equal_image_steps_scale_a_small_class_step_to_the_one_at_ipc_rows(digits):
    """One SGD step: with equal_image_steps an image of a class with 2 of ipc=5 rows moves 2/5 as far as
    without (DM's gradient on an image is divided by its class's rows); full classes move the same."""
    from fedistill.engines.base import init_synthetic

    picked = torch.cat([torch.nonzero(digits.train.labels == c).flatten()[:n] for c, n in ((0, 60), (1, 4))])
    data = digits.train.subset(picked)
    start, labels = init_synthetic(data, 5, init="real", seed=0, pad_small=False)
    assert torch.bincount(labels).tolist() == [5, 2]
    cfg = FAST | {"iterations": 1, "momentum": 0.0, "compile_synthetic": False, "pad_small_classes": False}
    moved = {
        equal: (build_engine("dm", **cfg, equal_image_steps=equal).distill(data, 5, seed=0).images - start)
        for equal in (False, True)
    }
    assert moved[False][labels == 1].abs().max() > 0
    torch.testing.assert_close(moved[True][labels == 1], 0.4 * moved[False][labels == 1])
    torch.testing.assert_close(moved[True][labels == 0], moved[False][labels == 0])


def test_same_seed_same_set_on_cpu(digits):
    cfg = FAST | {"iterations": 10}
    a = build_engine("dm", **cfg).distill(digits.train, 2, seed=3, device="cpu")
    b = build_engine("dm", **cfg).distill(digits.train, 2, seed=3, device="cpu")
    c = build_engine("dm", **cfg).distill(digits.train, 2, seed=4, device="cpu")
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


def test_partition_with_missing_classes(digits):
    keep = torch.nonzero(digits.train.labels < 3).flatten()
    part = digits.train.subset(keep[::5])  # few samples of classes 0-2 only
    syn = build_engine("dm", **FAST | {"iterations": 5}).distill(part, 4, seed=0)
    assert syn.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    syn.validate()


def test_bf16_real_branch_matches_fp32(digits):
    net = build_model("convnet", digits.info, seed=0, width=64).requires_grad_(False)
    classes = list(range(10))
    sampler = RealSampler(digits.train, classes, 256, torch.device("cpu"), torch_generator(0, "t"))
    real = sampler.sample()
    kw = {"dsa": None, "params": None, "chunk": 128}
    fp32 = real_class_means(net.embed, real, sampler.groups, sampler.counts, **kw)
    bf16_net = build_model("convnet", digits.info, seed=0, width=64).to(torch.bfloat16)
    bf16 = real_class_means(bf16_net.embed, real, sampler.groups, sampler.counts, dtype=torch.bfloat16, **kw)
    rel = (bf16 - fp32).norm() / fp32.norm()
    assert rel < 2e-2, float(rel)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(TypeError, match="valid options"):
        build_engine("dm", iteration=5)


@pytest.mark.slow
def test_dm_beats_random_subset_at_ipc10(digits):
    """DM at IPC 10 beats the random real subset of the same size (same evaluator, 3 seeds).

    The central digits model (two ConvNet blocks, configs/dataset_model/digits_convnet.yaml),
    300 iterations over 20 cached releases (as `simulate` runs DM), evaluated for 150 epochs.
    Margins over seeds (``tests/claims.py``), measured on the dev machine: 2.5, 3.1, 3.6 points on
    seeds 0-2 (seed 0 before, 2 runs: 97.08 vs 95.68; 300 epochs x 3 runs: 97.49 vs 95.91; a fresh
    release every iteration: 97.96, 9x the distillation time); the asserted margin is about half.
    """
    two_blocks = {"depth": 2}
    engine = build_engine("dm", iterations=300, releases=20, model_kwargs=two_blocks)
    spec, recipe = ModelSpec("convnet", two_blocks), EvalRecipe(epochs=150)
    gains = margins(lambda seed: engine.distill(digits.train, 10, seed=seed), digits, spec=spec, recipe=recipe)
    assert_beats(gains, floor=1.5, what="DM vs random subset")
