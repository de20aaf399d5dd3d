"""``fedistill audit RUN_DIR``: membership inference against models trained on a run's synthetic set.

Members are real training records the run distilled (the train split: every client's
partition is part of it); non-members are held-out test records. The same attacks run
against a model trained on a *real* random subset of matched accuracy, whose members
are the records it trained on: the gap is what distillation (and DP) buys.

Shadow models for the LiRA-style attack train on a reference population that no audited
model saw (the validation split plus the test records not used as non-members), with the
audited model's recipe and label counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedistill.data import DataBundle, Split, SyntheticSet, load_dataset
from fedistill.io import atomic_write_text, read_json_object, read_yaml_mapping
from fedistill.privacy.attacks import example_scores, lira_offline, roc_metrics
from fedistill.seeding import derive_seed, torch_generator
from fedistill.training import EvalRecipe, ModelSpec, accuracy, random_subset_indices, train_model

__all__ = ["AuditSettings", "RunDirError", "audit_training_set", "run_audit"]


class RunDirError(FileNotFoundError):
    """The audited run directory lacks a file the audit needs."""


@dataclass(frozen=True)
class AuditSettings:
    """What an audit trains (``audit.*`` in the config).

    Attributes
    ----------
    members
        Member and non-member candidates each (capped at half the test split).
    shadows
        Shadow models per audited model (LiRA, offline).
    matched
        Also audit a real random subset of matched accuracy.
    match_tolerance
        Percentage points within which the real subset's accuracy counts as matched; when no
        subset size gets that close, the audit says so (``matched: false``) instead of
        comparing unlike models.
    """

    members: int = 200
    shadows: int = 4
    matched: bool = True
    match_tolerance: float = 5.0


@dataclass
class _Audit:
    bundle: DataBundle
    spec: ModelSpec
    recipe: EvalRecipe
    seed: int
    device: torch.device
    settings: AuditSettings

    def train(self, images: torch.Tensor, targets: torch.Tensor, tag: str, k: int = 0) -> torch.nn.Module:
        seed = derive_seed(self.seed, "audit", tag, k)
        return train_model(
            self.spec, self.bundle.info, images, targets, recipe=self.recipe, seed=seed, device=self.device
        )


def _concat(a: Split, b: Split) -> Split:
    return Split(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]), a.info)


def audit_training_set(
    audit: _Audit,
    images: torch.Tensor,
    targets: torch.Tensor,
    members: Split,
    nonmembers: Split,
    population: Split,
    tag: str,
) -> dict[str, Any]:
    """Train on ``(images, targets)``, then run both attacks on ``members`` vs ``nonmembers``."""
    target = audit.train(images, targets, tag)
    cand = _concat(members, nonmembers)
    loss, phi = example_scores(target, cand.images, cand.labels, device=audit.device)
    hard = targets if targets.ndim == 1 else targets.argmax(1)
    shadow_phi = []
    for k in range(audit.settings.shadows):
        pick = random_subset_indices(population, hard, seed=derive_seed(audit.seed, "audit-shadow", tag, k))
        shadow = audit.train(population.images[pick], population.labels[pick], f"{tag}-shadow", k)
        shadow_phi.append(example_scores(shadow, cand.images, cand.labels, device=audit.device)[1])
    n = len(members)
    lira = lira_offline(phi, np.stack(shadow_phi))
    return {
        "train_images": len(images),
        "test_accuracy": round(100 * accuracy(target, audit.bundle.test, device=audit.device), 4),
        "loss_attack": roc_metrics(-loss[:n], -loss[n:]),
        "lira": roc_metrics(lira[:n], lira[n:]),
    }


def scaled_labels(labels: torch.Tensor, factor: float) -> torch.Tensor:
    """``labels``' class counts times ``factor`` (rounded; at least one per present class), class-ordered."""
    classes, counts = torch.unique(labels, return_counts=True)
    scaled = torch.clamp(torch.round(counts.double() * factor).long(), min=1)
    return classes.repeat_interleave(scaled)


def _matched_subset(audit: _Audit, syn_labels: torch.Tensor, target_acc: float) -> tuple[torch.Tensor, float]:
    """The real subset (the set's label proportions) whose accuracy is closest to ``target_acc``.

    Sizes tried: the set's label counts x 1, then x 2, 4, ... while below the target (up to
    the training set), or x 1/2, 1/4, ... while above it (down to one image per class).
    """
    train = audit.bundle.train
    tried: list[tuple[float, torch.Tensor, float]] = []
    factor = 1.0
    while True:
        labels = scaled_labels(syn_labels, factor)
        pick = random_subset_indices(train, labels, seed=derive_seed(audit.seed, "audit-matched"))
        model = audit.train(train.images[pick], train.labels[pick], "matched-search", len(pick))
        acc = 100 * accuracy(model, audit.bundle.test, device=audit.device)
        tried.append((abs(acc - target_acc), pick, acc))
        up = acc < target_acc
        if (up and factor < 1) or (not up and factor > 1):  # crossed the target
            break
        if (up and len(pick) >= len(train)) or (not up and len(labels) <= len(torch.unique(syn_labels))):
            break
        factor = factor * 2 if up else factor / 2
    _, pick, acc = min(tried, key=lambda t: t[0])
    return pick, acc


def audit_notes(result: dict[str, Any], *, tolerance: float, num_classes: int) -> list[str]:
    """What a reader must know to read an audit: an unmatched comparison, AUCs below 0.5."""
    notes = []
    syn_acc = result["synthetic"]["test_accuracy"]
    real = result.get("matched_real_subset")
    if real is not None and not real["matched"]:
        notes.append(
            f"no real subset with the set's label proportions matches its {syn_acc:.2f}% within {tolerance:g} points "
            f"(closest: {real['test_accuracy']:.2f}% with {real['train_images']} images): the two audits compare "
            "models of different accuracy"
        )
    for key in ("synthetic", "matched_real_subset"):
        r = result.get(key)
        for attack in ("loss_attack", "lira") if r else ():
            if r[attack]["auc"] < 0.5:
                chance = " (near chance level)" if r["test_accuracy"] < 100 / num_classes + 5 else ""
                notes.append(
                    f"{key} {attack}: AUC {r[attack]['auc']:.2f} < 0.5 on a model at {r['test_accuracy']:.2f}% test "
                    f"accuracy{chance}: the attack does worse than guessing; read it as no measurable membership "
                    "signal, not as negative leakage"
                )
    return notes


def run_audit(cfg: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Audit the run in ``cfg["run_dir"]``; writes ``audit.json`` and ``audit.png`` into ``out_dir``.

    ``cfg`` is a composed ``audit`` config (``configs/audit.yaml``); the run's own ``config.yaml``
    is read from disk and may come from an older version (its ``data`` keys are optional).
    """
    from fedistill.engines import resolve_device
    from fedistill.reporting import RunDir

    run_dir = Path(cfg["run_dir"])
    syn_path, cfg_path = run_dir / "synthetic.safetensors", run_dir / "config.yaml"
    for p in (syn_path, cfg_path):
        if not p.is_file():
            raise RunDirError(
                f"{p} not found: fedistill audit needs a finished `fedistill central` or `fedistill simulate` run "
                "directory (with synthetic.safetensors and config.yaml)"
            )
    fix = "audit the directory of a finished run, with the files that run wrote"
    run_cfg = read_yaml_mapping(cfg_path, RunDirError, fix)
    if "model" not in run_cfg or not ("eval" in run_cfg or "strategy" in run_cfg):
        raise RunDirError(f"{cfg_path}: has no 'model' and 'eval'/'strategy' settings; {fix}")
    summary_path = run_dir / "summary.json"  # read before the long audit, so a damaged one fails fast
    summary = read_json_object(summary_path, RunDirError, fix) if summary_path.is_file() else {}
    syn = SyntheticSet.load(syn_path)
    data = run_cfg.get("data") or {}
    bundle = load_dataset(syn.info.name, root=data.get("root"), val_fraction=float(data.get("val_fraction", 0.1)))
    syn.validate(bundle.info)
    model = dict(run_cfg["model"])
    recipe_cfg = dict(run_cfg["eval"]) if "eval" in run_cfg else dict(run_cfg["strategy"].get("server", {}))
    recipe_cfg = {k: v for k, v in recipe_cfg.items() if k in EvalRecipe.__dataclass_fields__}
    if cfg["epochs"]:
        recipe_cfg["epochs"] = int(cfg["epochs"])
    settings = AuditSettings(**{k: cfg[k] for k in ("members", "shadows", "matched", "match_tolerance")})
    audit = _Audit(
        bundle,
        ModelSpec(model.pop("name"), model),
        EvalRecipe(**recipe_cfg),
        int(cfg["seed"]),
        resolve_device(cfg["device"]),
        settings,
    )
    g = torch_generator(audit.seed, "audit-candidates")
    n = min(settings.members, len(bundle.test) // 2, len(bundle.train))
    test_perm = torch.randperm(len(bundle.test), generator=g)
    nonmembers, population = bundle.test.subset(test_perm[:n]), _concat(bundle.val, bundle.test.subset(test_perm[n:]))
    members = bundle.train.subset(torch.randperm(len(bundle.train), generator=g)[:n])
    targets = syn.soft_labels if syn.soft_labels is not None else syn.hard_labels
    result: dict[str, Any] = {"run_dir": str(run_dir.resolve()), "method": syn.metadata.get("method")}
    result["synthetic"] = audit_training_set(audit, syn.images, targets, members, nonmembers, population, "synthetic")
    if settings.matched:
        target_acc = result["synthetic"]["test_accuracy"]
        pick, _ = _matched_subset(audit, syn.hard_labels, target_acc)
        real_members = bundle.train.subset(pick[torch.randperm(len(pick), generator=g)[:n]])
        images, labels = bundle.train.images[pick], bundle.train.labels[pick]
        real = audit_training_set(
            audit, images, labels, real_members, nonmembers.subset(torch.arange(len(real_members))), population, "real"
        )
        real["matched"] = abs(real["test_accuracy"] - target_acc) <= settings.match_tolerance
        result["matched_real_subset"] = real
    result["notes"] = audit_notes(result, tolerance=settings.match_tolerance, num_classes=bundle.info.num_classes)
    if "privacy" in summary:
        result["privacy"] = {k: v for k, v in summary["privacy"].items() if k != "public"}
    out = RunDir(out_dir)
    atomic_write_text(out.path / "audit.json", json.dumps(result, indent=2))
    _roc_plot(result, out.path / "audit.png")
    return result


def _roc_plot(result: dict[str, Any], path: Path) -> None:
    from fedistill.reporting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for key, name in (("synthetic", "synthetic set"), ("matched_real_subset", "real subset")):
        for attack in ("loss_attack", "lira"):
            if key in result:
                r = result[key][attack]
                ax.plot(r["curve"]["fpr"], r["curve"]["tpr"], label=f"{name}, {attack} (AUC {r['auc']:.2f})")
    ax.plot([1e-3, 1], [1e-3, 1], "k:", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="false positive rate", ylabel="true positive rate", xlim=(1e-3, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
