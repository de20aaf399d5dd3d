"""Membership-inference audit: ROC metrics, the attacks on models that did / did not see members, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_cli import fedistill

from fedistill.config import compose_config
from fedistill.data import SyntheticSet
from fedistill.evaluation import EvalRecipe, ModelSpec
from fedistill.privacy.attacks import lira_offline, roc_metrics
from fedistill.privacy.audit import AuditSettings, _Audit, audit_training_set


def test_roc_metrics_extremes():
    rng = np.random.default_rng(0)
    same = roc_metrics(rng.normal(size=2000), rng.normal(size=2000))
    assert abs(same["auc"] - 0.5) < 0.03 and same["tpr_at_1pct_fpr"] < 0.05
    apart = roc_metrics(rng.normal(5, 1, 500), rng.normal(0, 1, 500))
    assert apart["auc"] > 0.99 and apart["tpr_at_1pct_fpr"] > 0.9


def test_lira_calibrates_per_example_difficulty():
    """An example easy for every shadow is not flagged just because the target is confident on it."""
    shadows = np.array([[5.0, 0.0], [5.2, 0.1], [4.8, -0.1]])
    scores = lira_offline(np.array([5.0, 3.0]), shadows)
    assert scores[1] > scores[0]
    with pytest.raises(ValueError, match="at least 2 shadow"):
        lira_offline(np.zeros(2), shadows[:1])
    # the score is the z-score against the shadows: mean per example, one global std (two shadows suffice)
    two = np.array([[1.0, 4.0], [3.0, 0.0]])  # means (2, 2); deviations (-1, 2, 1, -2): std sqrt(2.5)
    np.testing.assert_allclose(lira_offline(np.array([2.0, 6.0]), two), [0.0, 4 / np.sqrt(2.5)], rtol=1e-6)


def test_roc_metrics_report_exact_rates_at_their_fpr_limits_and_a_seeded_interval():
    """TPR at a FPR counts thresholds whose FPR equals the limit; every field is there and named;
    the bootstrap interval is the same for the same seed."""
    members, nonmembers = np.array([3.0, 2.0, 0.5]), np.array([1.0, 0.0, -1.0, -2.0])
    out = roc_metrics(members, nonmembers, bootstrap=50, seed=3)
    assert set(out) == {
        "auc", "auc_ci95", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_ci95", "tpr_at_0.1pct_fpr", "members", "nonmembers",
        "curve",
    }  # fmt: skip
    assert out["auc"] == pytest.approx(11 / 12) and (out["members"], out["nonmembers"]) == (3, 4)
    assert out["tpr_at_1pct_fpr"] == pytest.approx(2 / 3) and out["tpr_at_0.1pct_fpr"] == pytest.approx(2 / 3)
    assert set(out["curve"]) == {"fpr", "tpr"} and out["curve"]["tpr"][-1] == 1.0
    lo, hi = out["auc_ci95"]
    assert 0.5 <= lo <= out["auc"] <= hi <= 1.0
    rng = np.random.default_rng(0)
    m, n = rng.normal(1, 1, 60), rng.normal(0, 1, 60)
    assert roc_metrics(m, n, bootstrap=50, seed=3)["auc_ci95"] == roc_metrics(m, n, bootstrap=50, seed=3)["auc_ci95"]
    assert roc_metrics(m, n, bootstrap=50, seed=3)["auc_ci95"] != roc_metrics(m, n, bootstrap=50, seed=4)["auc_ci95"]
    from fedistill.privacy.attacks import _tpr_at

    fpr, tpr = np.array([0.0, 0.01, 0.5]), np.array([0.2, 0.7, 0.9])
    assert _tpr_at(fpr, tpr, 0.01) == 0.7  # a threshold exactly at the limit counts
    assert _tpr_at(fpr[1:], tpr[1:], 0.001) == 0.0  # no threshold within the limit: no true positive claimed


@pytest.mark.slow
def test_audit_separates_seen_from_unseen_members(digits):
    """100 members, 100 non-members (test). A model overfit to the members (no augmentation, 150
    epochs) is clearly attackable; a model trained on other training records is not.
    Measured: loss AUC 0.73 (seen) vs 0.50 (unseen)."""
    audit = _Audit(
        digits,
        ModelSpec("convnet", {"width": 32, "depth": 2}),
        EvalRecipe(epochs=150, dsa=False, batch_size=64),
        0,
        torch.device("cpu"),
        AuditSettings(shadows=2),
    )
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(digits.train), generator=g)
    members, others = digits.train.subset(perm[:100]), digits.train.subset(perm[100:200])
    tperm = torch.randperm(len(digits.test), generator=g)
    nonmembers, population = digits.test.subset(tperm[:100]), digits.val
    seen = audit_training_set(audit, members.images, members.labels, members, nonmembers, population, "seen")
    unseen = audit_training_set(audit, others.images, others.labels, members, nonmembers, population, "unseen")
    print(
        "seen",
        seen["loss_attack"]["auc"],
        seen["lira"]["auc"],
        "unseen",
        unseen["loss_attack"]["auc"],
        unseen["lira"]["auc"],
    )
    assert seen["loss_attack"]["auc"] > 0.65 and seen["lira"]["auc"] > 0.65
    assert abs(unseen["loss_attack"]["auc"] - 0.5) < 0.1 and abs(unseen["lira"]["auc"] - 0.5) < 0.1


def test_audit_writes_results_and_a_plot_and_leaves_the_run_config(digits, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    cfg = compose_config("central", ["model.width=16", "model.depth=2"])
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    idx = torch.arange(0, len(digits.train), 50)
    SyntheticSet(digits.train.images[idx], digits.train.labels[idx], digits.info).save(run / "synthetic.safetensors")
    # in process, through the command's task (its Hydra wiring: test_audit_command_rejects_a_bad_run_dir)
    from fedistill.cli import _print_audit
    from fedistill.privacy.audit import run_audit
    from fedistill.privacy.report import audit_table

    overrides = [f"run_dir={run}", "epochs=3", "shadows=2", "members=40", "device=cpu"]
    _print_audit(run_audit)(compose_config("audit", overrides), run / "audit")
    result = json.loads((run / "audit" / "audit.json").read_text())
    syn, real = result["synthetic"], result["matched_real_subset"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"run directory: {(run / 'audit').resolve()}  (synthetic set: loss AUC {syn['loss_attack']['auc']:.3f}, "
        f"LiRA AUC {syn['lira']['auc']:.3f}; real subset (matched acc): loss AUC {real['loss_attack']['auc']:.3f}, "
        f"LiRA AUC {real['lira']['auc']:.3f})"
    )
    assert {"synthetic", "matched_real_subset"} <= set(result)
    for key in ("loss_attack", "lira"):
        r = result["synthetic"][key]
        assert 0 <= r["auc"] <= 1 and r["members"] == r["nonmembers"] == 40
    assert (run / "audit" / "audit.png").stat().st_size > 0
    assert audit_table(result).row_count >= 2
    assert OmegaConf.load(run / "config.yaml").model.width == 16  # the run's own config is untouched


def test_audit_command_rejects_a_bad_run_dir(tmp_path):
    bad = fedistill("audit", str(tmp_path / "missing"), cwd=tmp_path, check=False)
    assert bad.returncode == 1 and "synthetic.safetensors not found" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_roc_metrics_report_their_bootstrap_uncertainty():
    rng = np.random.default_rng(1)
    m = roc_metrics(rng.normal(0.3, 1, 200), rng.normal(0, 1, 200))
    lo, hi = m["auc_ci95"]
    assert lo < m["auc"] < hi and 0.02 < hi - lo < 0.2  # ~0.1 wide for 200 vs 200
    assert m["tpr_at_1pct_fpr_ci95"][0] <= m["tpr_at_1pct_fpr"] <= m["tpr_at_1pct_fpr_ci95"][1]


class _SizeAudit:
    """An audit whose 'model' is its training-set size (accuracy is then a function of size)."""

    def __init__(self, digits):
        self.bundle, self.seed, self.device = digits, 0, torch.device("cpu")

    def train(self, images, targets, tag, k=0):
        return len(images)


def test_matched_subset_searches_below_the_sets_size_when_the_set_is_weaker(digits, monkeypatch):
    """A near-chance set (12%) is matched by a smaller real subset, not by one of its own size at ~99%."""
    import fedistill.privacy.audit as audit_module

    monkeypatch.setattr(audit_module, "accuracy", lambda n, test, device: min(0.99, n / 200))
    labels = torch.arange(10).repeat_interleave(20)  # 200 images: 99% at its own size
    pick, acc = audit_module._matched_subset(_SizeAudit(digits), labels, 12.0)
    assert abs(acc - 12.0) <= 2.5 and len(pick) < len(labels)
    assert len(audit_module.scaled_labels(labels, 0.01)) == 10  # one image per class at the bottom
    pick, acc = audit_module._matched_subset(_SizeAudit(digits), torch.arange(10).repeat_interleave(2), 40.0)
    assert acc == 40.0 and len(pick) == 80  # a stronger set: the search goes up (x2, x4)


def test_audit_notes_explain_unmatched_subsets_and_aucs_below_half():
    from fedistill.privacy.audit import audit_notes

    attack = {"auc": 0.44}
    result = {
        "synthetic": {"test_accuracy": 4.74, "loss_attack": attack, "lira": {"auc": 0.52}},
        "matched_real_subset": {
            "test_accuracy": 99.16,
            "train_images": 860,
            "matched": False,
            "loss_attack": {"auc": 0.51},
            "lira": {"auc": 0.55},
        },
    }
    notes = audit_notes(result, tolerance=5.0, num_classes=10)
    assert len(notes) == 2
    assert "no real subset" in notes[0] and "99.16%" in notes[0]
    assert "AUC 0.44 < 0.5" in notes[1] and "near chance level" in notes[1]
    result["matched_real_subset"]["matched"] = True
    result["synthetic"]["loss_attack"] = {"auc": 0.6}
    assert audit_notes(result, tolerance=5.0, num_classes=10) == []
    result["matched_real_subset"]["lira"] = {"auc": 0.41}  # the real subset's AUCs are read too
    (note,) = audit_notes(result, tolerance=5.0, num_classes=10)
    assert "0.41" in note and "near chance level" not in note


def _federated_run(tmp_path, digits, *, val_fraction: float):
    """A finished `simulate` run directory: its config has `strategy.server` (no `eval`), a `data`
    block and a summary with the privacy report; the set carries soft labels."""
    run = tmp_path / "fed"
    run.mkdir(parents=True)
    cfg = compose_config("simulate", ["model.width=16", "model.depth=2", f"data.val_fraction={val_fraction}"])
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    privacy = {"epsilon_max": 4.0, "epsilon_median": 3.0, "delta": 1e-5, "public": ["class counts: exact"]}
    (run / "summary.json").write_text(json.dumps({"privacy": privacy}))
    idx = torch.arange(0, len(digits.train), 40)
    soft = torch.nn.functional.one_hot(digits.train.labels[idx], 10).float()
    meta = {"method": "dm"}
    SyntheticSet(digits.train.images[idx], digits.train.labels[idx], digits.info, soft, meta).save(
        run / "synthetic.safetensors"
    )
    return run


def test_audit_of_a_federated_run_reports_its_run_method_privacy_and_notes_reproducibly(digits, tmp_path):
    """Through `run_audit` in process: the result names the run and its method, carries the run's
    privacy report without the public-release list, its notes are `audit_notes` of its numbers, the
    candidates and shadows follow the seed (two audits write the same file) and the server's recipe
    comes from `strategy.server` when the run has no `eval` block."""
    from fedistill.privacy.audit import audit_notes, run_audit

    run = _federated_run(tmp_path, digits, val_fraction=0.2)
    overrides = [f"run_dir={run}", "epochs=2", "shadows=2", "members=30", "device=cpu", "match_tolerance=3"]
    first = run_audit(compose_config("audit", overrides), tmp_path / "a1")
    run_audit(compose_config("audit", overrides), tmp_path / "a2")
    text = (tmp_path / "a1" / "audit.json").read_text()
    assert text == (tmp_path / "a2" / "audit.json").read_text() and text.startswith('{\n  "run_dir": ')
    result = json.loads(text)
    assert result["run_dir"] == str(run.resolve()) and result["method"] == "dm"
    assert result["privacy"] == {"epsilon_max": 4.0, "epsilon_median": 3.0, "delta": 1e-5}
    assert result["notes"] == audit_notes(result, tolerance=3.0, num_classes=10) and result == json.loads(
        json.dumps(first)
    )
    syn, real = result["synthetic"], result["matched_real_subset"]
    assert syn["train_images"] == len(range(0, len(digits.train), 40))
    for r in (syn, real):
        assert r["loss_attack"]["members"] == r["loss_attack"]["nonmembers"] == r["lira"]["members"]
    assert syn["loss_attack"]["members"] == 30
    assert real["matched"] == (abs(real["test_accuracy"] - syn["test_accuracy"]) <= 3.0)


def test_audit_reads_the_runs_data_split_and_refuses_a_broken_run_dir_with_its_fix(digits, tmp_path):
    """The run's own `data.val_fraction` shapes the shadow population; a run dir without a model, or
    with a damaged summary or config, fails before any training with the file, the problem and the fix."""
    from fedistill.privacy.audit import RunDirError, run_audit

    fix = "audit the directory of a finished run, with the files that run wrote"
    opts = ["epochs=2", "shadows=2", "members=30", "device=cpu", "matched=false"]
    scores = []
    for frac in (0.1, 0.3):
        run = _federated_run(tmp_path / str(frac), digits, val_fraction=frac)
        result = run_audit(compose_config("audit", [f"run_dir={run}", *opts]), tmp_path / f"out{frac}")
        scores.append(result["synthetic"]["lira"]["auc"])
    assert scores[0] != scores[1]  # a different population: different shadows
    (run / "summary.json").write_text("[1, 2]")
    with pytest.raises(RunDirError) as err:
        run_audit(compose_config("audit", [f"run_dir={run}", *opts]), tmp_path / "x")
    assert str(err.value) == f"{run / 'summary.json'}: not a JSON object (it holds a list); {fix}"
    (run / "summary.json").unlink()
    (run / "config.yaml").write_text("eval: {epochs: 3}\n")
    with pytest.raises(RunDirError) as err:
        run_audit(compose_config("audit", [f"run_dir={run}", *opts]), tmp_path / "x")
    assert str(err.value) == f"{run / 'config.yaml'}: has no 'model' and 'eval'/'strategy' settings; {fix}"
    (run / "config.yaml").write_text("model: {name: convnet}\n")
    with pytest.raises(RunDirError, match="has no 'model' and 'eval'/'strategy'"):
        run_audit(compose_config("audit", [f"run_dir={run}", *opts]), tmp_path / "x")
    (run / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(RunDirError) as err:
        run_audit(compose_config("audit", [f"run_dir={run}", *opts]), tmp_path / "x")
    assert str(err.value).startswith(f"{run / 'config.yaml'}: not a readable config (") and str(err.value).endswith(fix)
    (run / "config.yaml").unlink()
    with pytest.raises(RunDirError) as err:
        run_audit(compose_config("audit", [f"run_dir={run}", *opts]), tmp_path / "x")
    assert str(err.value) == (
        f"{run / 'config.yaml'} not found: fedistill audit needs a finished `fedistill central` or "
        "`fedistill simulate` run directory (with synthetic.safetensors and config.yaml)"
    )
    assert not (tmp_path / "x").exists()  # nothing written before the checks pass


def test_roc_plot_draws_each_attack_on_each_set_with_its_auc_on_log_axes(tmp_path, monkeypatch):
    """audit.png: one curve per (set, attack) labelled with its AUC, the chance diagonal, log-log
    axes from FPR 1e-3; a set the audit did not score is left out."""
    from fedistill.privacy.audit import _roc_plot
    from fedistill.reporting import pyplot

    plt = pyplot()
    closed, close = [], plt.close
    monkeypatch.setattr(plt, "close", closed.append)

    def attack(auc: float, tpr: list[float]) -> dict:
        return {"auc": auc, "curve": {"fpr": [1e-3, 0.1, 1.0], "tpr": tpr}}

    result = {
        "synthetic": {"loss_attack": attack(0.514, [0.002, 0.2, 1.0]), "lira": attack(0.6, [0.01, 0.3, 1.0])},
        "matched_real_subset": {"loss_attack": attack(0.7, [0.05, 0.5, 1.0]), "lira": attack(0.826, [0.1, 0.6, 1.0])},
    }
    _roc_plot(result, tmp_path / "roc.png")
    (fig,) = closed
    try:
        (ax,) = fig.axes
        curves = [(line.get_label(), list(line.get_ydata())) for line in ax.get_lines()]
        assert all(list(line.get_xdata()) == [1e-3, 0.1, 1.0] for line in ax.get_lines()[:4])
        assert curves[:4] == [
            ("synthetic set, loss_attack (AUC 0.51)", [0.002, 0.2, 1.0]),
            ("synthetic set, lira (AUC 0.60)", [0.01, 0.3, 1.0]),
            ("real subset, loss_attack (AUC 0.70)", [0.05, 0.5, 1.0]),
            ("real subset, lira (AUC 0.83)", [0.1, 0.6, 1.0]),
        ]
        diagonal = ax.get_lines()[4]
        assert list(diagonal.get_xdata()) == list(diagonal.get_ydata()) == [1e-3, 1]
        assert diagonal.get_linestyle() == ":" and diagonal.get_linewidth() == 0.8
        assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
        assert ax.get_xlim() == pytest.approx((1e-3, 1))
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("false positive rate", "true positive rate")
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == [c[0] for c in curves[:4]] and ax.get_legend().get_texts()[0].get_fontsize() == 7
        assert tuple(fig.get_size_inches()) == (4.5, 4.5)
        png = (tmp_path / "roc.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (540, 540)  # 4.5 in at 120 dpi
    finally:
        close(fig)
    del result["matched_real_subset"]
    _roc_plot(result, tmp_path / "syn.png")
    try:
        labels = [line.get_label() for line in closed[1].axes[0].get_lines()]
        assert labels[:2] == ["synthetic set, loss_attack (AUC 0.51)", "synthetic set, lira (AUC 0.60)"]
        assert len(labels) == 3  # and the diagonal
    finally:
        close(closed[1])


class _RecordingAudit(_SizeAudit):
    """A :class:`_SizeAudit` that records every training call of the search."""

    def __init__(self, digits):
        super().__init__(digits)
        self.calls: list[tuple[int, str, int, torch.Tensor]] = []

    def train(self, images, targets, tag, k=0):
        self.calls.append((len(images), tag, k, targets.clone()))
        return len(images)


def test_matched_subset_tries_doubling_and_halving_sizes_and_keeps_the_closest(digits, monkeypatch):
    """The search's exact path: x1, then x1/2, x1/4, ... down to one image per class (or x2, x4, ... up
    to the training set), stopping once it crosses the target; the closest accuracy wins, its pick
    drawn from the audit's own seed stream with the set's label proportions."""
    import fedistill.privacy.audit as audit_module
    from fedistill.seeding import derive_seed
    from fedistill.training import random_subset_indices

    monkeypatch.setattr(audit_module, "accuracy", lambda n, test, device: min(0.99, n / 200))
    labels = torch.arange(10).repeat_interleave(20)
    audit = _RecordingAudit(digits)
    pick, acc = audit_module._matched_subset(audit, labels, 12.0)
    assert [c[0] for c in audit.calls] == [200, 100, 50, 20]  # 99, 50, 25, 10%: crossed below 12
    assert all(c[1] == "matched-search" and c[2] == c[0] for c in audit.calls)
    assert acc == 10.0 and len(pick) == 20  # |10 - 12| < |25 - 12|
    expected = random_subset_indices(
        digits.train, audit_module.scaled_labels(labels, 0.125), seed=derive_seed(0, "audit-matched")
    )
    assert torch.equal(pick, expected)
    assert torch.equal(audit.calls[-1][3], digits.train.labels[expected])

    audit = _RecordingAudit(digits)  # never reaches the target going down: stops at one image per class
    pick, acc = audit_module._matched_subset(audit, labels, 1.0)
    assert [c[0] for c in audit.calls] == [200, 100, 50, 20, 10] and len(pick) == 10 and acc == 5.0

    monkeypatch.setattr(audit_module, "accuracy", lambda n, test, device: n / 400)
    audit = _RecordingAudit(digits)  # the set's own size hits the target exactly: one step down, then stop
    pick, acc = audit_module._matched_subset(audit, labels, 50.0)
    assert [c[0] for c in audit.calls] == [200, 100] and acc == 50.0 and len(pick) == 200
    monkeypatch.setattr(audit_module, "accuracy", lambda n, test, device: min(0.99, n / 200))

    audit = _RecordingAudit(digits)  # going up: x2, x4 until at or past the target
    pick, acc = audit_module._matched_subset(audit, torch.arange(10).repeat_interleave(2), 35.0)
    assert [c[0] for c in audit.calls] == [20, 40, 80] and acc == 40.0 and len(pick) == 80

    audit = _RecordingAudit(digits)  # never reaches it going up: stops at the whole training set
    monkeypatch.setattr(audit_module, "accuracy", lambda n, test, device: 0.05)
    pick, acc = audit_module._matched_subset(audit, torch.arange(10).repeat_interleave(100), 50.0)
    sizes = [c[0] for c in audit.calls]
    assert sizes[0] == 1000 and sizes[-1] == len(digits.train) and len(sizes) == 2 and len(pick) == 1000


class _ScoredModel:
    """A stand-in 'model' of the audit's wiring test: what it was trained on, and its per-example scores."""

    def __init__(self, tag: str, k: int, n: int, loss: np.ndarray, phi: np.ndarray) -> None:
        self.tag, self.k, self.n, self.loss, self.phi = tag, k, n, loss, phi


def test_audit_training_set_wires_the_target_its_shadows_and_both_attacks(digits, monkeypatch):
    """``audit_training_set``: the target trains on the set under its tag; each shadow k on its own
    draw of the population (the audit's ``audit-shadow`` stream for that tag and k) with the set's
    hard labels' counts; the loss attack scores low loss as member; LiRA uses every shadow; accuracy
    is reported in percent to 4 decimals; scores are taken on the audit's device."""
    import fedistill.privacy.audit as audit_module
    from fedistill.seeding import derive_seed
    from fedistill.training import random_subset_indices

    n = 6
    members, nonmembers = digits.train.subset(torch.arange(n)), digits.test.subset(torch.arange(n))
    member_loss = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 2.0])  # one member above every non-member
    trained, scored = [], []

    class Audit(_SizeAudit):
        settings = AuditSettings(shadows=3)

        def train(self, images, targets, tag, k=0):
            trained.append((tag, k, images.clone(), targets.clone()))
            loss = np.r_[member_loss, np.linspace(1.1, 1.5, n)] if tag == "syn" else np.ones(2 * n)
            phi = np.r_[np.full(n, 3.0), np.zeros(n)] if tag == "syn" else np.linspace(0, 1, 2 * n) * (k + 1)
            return _ScoredModel(tag, k, len(images), loss, phi)

    def scores(model, images, labels, *, device):
        scored.append((model.tag, model.k, device, torch.equal(labels[:n], members.labels)))
        return model.loss, model.phi

    monkeypatch.setattr(audit_module, "example_scores", scores)
    monkeypatch.setattr(audit_module, "accuracy", lambda model, test, device: 0.123456789 if model.tag == "syn" else 0)
    audit = Audit(digits)
    audit.device = torch.device("meta")  # only ever passed through
    soft = torch.nn.functional.one_hot(torch.arange(10).repeat(2), 10).float()
    images = digits.train.images[:20]
    out = audit_module.audit_training_set(audit, images, soft, members, nonmembers, digits.val, "syn")

    assert [(t, k) for t, k, _, _ in trained] == [("syn", 0), ("syn-shadow", 0), ("syn-shadow", 1), ("syn-shadow", 2)]
    assert torch.equal(trained[0][2], images) and torch.equal(trained[0][3], soft)
    for k, (_, _, shadow_images, shadow_labels) in enumerate(trained[1:]):
        pick = random_subset_indices(digits.val, soft.argmax(1), seed=derive_seed(0, "audit-shadow", "syn", k))
        assert torch.equal(shadow_images, digits.val.images[pick]) and torch.equal(
            shadow_labels, digits.val.labels[pick]
        )
    assert not torch.equal(trained[1][2], trained[2][2])  # each shadow its own draw
    assert scored == [("syn", 0, torch.device("meta"), True)] + [
        ("syn-shadow", k, torch.device("meta"), True) for k in range(3)
    ]
    assert out["train_images"] == 20 and out["test_accuracy"] == 12.3457
    # 5 of 6 members below every non-member's loss (1.1-1.5), one above all: AUC 30/36
    assert out["loss_attack"]["auc"] == pytest.approx(30 / 36)
    assert out["lira"]["auc"] == 1.0


def test_run_audit_builds_the_audit_from_the_run_and_draws_members_from_its_seed(digits, tmp_path, monkeypatch):
    """``run_audit``'s wiring, without training: the run's model, server recipe (the audit's ``epochs``
    on top), data root and split, the audit's device; at most half the test split as members and as
    many non-members, drawn from the ``audit-candidates`` stream; the set's soft labels as targets;
    an older run's config without a ``data`` block gets the 0.1 validation split it was made with."""
    import fedistill.privacy.audit as audit_module
    from fedistill.data import load_dataset
    from fedistill.seeding import torch_generator

    run = _federated_run(tmp_path / "run", digits, val_fraction=0.2)
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.strategy.server.lr, cfg.data.root = 0.037, str(tmp_path / "data-root")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    loads, calls = [], []

    def load(name, *, root, val_fraction):
        loads.append((name, root, val_fraction))
        return load_dataset(name, root=root, val_fraction=val_fraction)

    real_acc = [52.0]

    def audit_set(audit, images, targets, members, nonmembers, population, tag):
        calls.append((audit, images, targets, members, nonmembers, population, tag))
        acc = 50.0 if tag == "synthetic" else real_acc[0]
        return {"train_images": len(images), "test_accuracy": acc, "loss_attack": {"auc": 0.5}, "lira": {"auc": 0.5}}

    monkeypatch.setattr(audit_module, "load_dataset", load)
    monkeypatch.setattr(audit_module, "audit_training_set", audit_set)
    monkeypatch.setattr(audit_module, "_roc_plot", lambda result, path: None)
    opts = ["epochs=7", "shadows=2", "members=100000", "device=cpu", "matched=false", "seed=3"]
    audit_module.run_audit(compose_config("audit", [f"run_dir={run}", *opts]), tmp_path / "out")

    assert loads == [("digits", str(tmp_path / "data-root"), 0.2)]
    ((audit, images, targets, members, nonmembers, population, tag),) = calls
    bundle = load_dataset("digits", val_fraction=0.2)
    syn = SyntheticSet.load(run / "synthetic.safetensors")
    assert tag == "synthetic" and torch.equal(images, syn.images) and torch.equal(targets, syn.soft_labels)
    assert audit.spec.name == "convnet" and audit.spec.kwargs["width"] == 16 and audit.spec.kwargs["depth"] == 2
    assert (audit.recipe.lr, audit.recipe.epochs) == (0.037, 7) and audit.device == torch.device("cpu")
    assert audit.seed == 3 and audit.settings.shadows == 2
    n = len(bundle.test) // 2
    g = torch_generator(3, "audit-candidates")
    test_perm = torch.randperm(len(bundle.test), generator=g)
    assert torch.equal(nonmembers.images, bundle.test.images[test_perm[:n]])
    assert torch.equal(members.images, bundle.train.images[torch.randperm(len(bundle.train), generator=g)[:n]])
    assert len(population) == len(bundle.val) + len(bundle.test) - n

    del cfg["data"]  # a run written before the config had a data block
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    audit_module.run_audit(compose_config("audit", [f"run_dir={run}", *opts]), tmp_path / "out2")
    assert loads[-1] == ("digits", None, 0.1)

    # the matched real subset: "matched" within the tolerance, its edge included; a note when not
    monkeypatch.setattr(audit_module, "_matched_subset", lambda audit, labels, target: (torch.arange(40), 0.0))
    matched = [*opts[:4], "matched=true", "match_tolerance=2.0", "seed=3"]
    result = audit_module.run_audit(compose_config("audit", [f"run_dir={run}", *matched]), tmp_path / "out3")
    assert calls[-1][-1] == "real" and result["matched_real_subset"]["matched"] is True and result["notes"] == []
    real_acc[0] = 52.5
    result = audit_module.run_audit(compose_config("audit", [f"run_dir={run}", *matched]), tmp_path / "out4")
    assert result["matched_real_subset"]["matched"] is False
    assert result["notes"][0].startswith(
        "no real subset with the set's label proportions matches its 50.00% within 2 points"
    )


def test_run_audit_refuses_a_set_that_does_not_fit_its_dataset_before_any_training(digits, tmp_path, monkeypatch):
    """A set whose stored image size is not its dataset's (16x16 'digits') fails the dataset's check."""
    import dataclasses

    import fedistill.privacy.audit as audit_module
    from fedistill.data import SyntheticSetError

    run = _federated_run(tmp_path / "run", digits, val_fraction=0.1)
    wrong = dataclasses.replace(digits.info, image_size=(16, 16))
    SyntheticSet(torch.zeros(10, 1, 16, 16), torch.arange(10), wrong).save(run / "synthetic.safetensors")
    monkeypatch.setattr(
        audit_module, "audit_training_set", lambda *a: pytest.fail("trained on a set that does not fit")
    )
    with pytest.raises(SyntheticSetError, match="images"):
        audit_module.run_audit(compose_config("audit", [f"run_dir={run}", "device=cpu"]), tmp_path / "out")
