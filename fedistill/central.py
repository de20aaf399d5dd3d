"""Central (single-machine) distillation: dataset -> engine -> SyntheticSet -> evaluation -> run dir.

The functions here take plain nested dicts (the resolved Hydra config), so they
work from the CLI, from notebooks and from tests alike.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from fedistill.checkpoint import Checkpoint, CheckpointError, config_key, resume_config
from fedistill.data import DataBundle, SyntheticSet, SyntheticSetError, load_dataset
from fedistill.engines import ENGINES, DistillRequest, build_engine, resolve_device
from fedistill.evaluation import EvalRecipe, ModelSpec, evaluate_synthetic
from fedistill.privacy import privacy_line, privacy_summary
from fedistill.reporting import (
    RunDir,
    baseline_warning,
    chance_warning,
    progress_bars,
    results_table,
    run_line,
    save_grid,
)

__all__ = ["eval_settings", "result_warnings", "run_central", "run_evaluate"]


def _model_spec(model_cfg: dict[str, Any] | str) -> ModelSpec:
    if isinstance(model_cfg, str):
        return ModelSpec(model_cfg)
    opts = dict(model_cfg)
    return ModelSpec(opts.pop("name"), opts)


def eval_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`~fedistill.evaluation.evaluate_synthetic` from a config (its ``eval`` group)."""
    ev = cfg["eval"]
    recipe_keys = set(EvalRecipe.__dataclass_fields__)
    recipe = EvalRecipe(**{k: v for k, v in ev.items() if k in recipe_keys})
    models = [_model_spec(cfg["model"]), *(_model_spec(m) for m in ev["models"] or [])]
    return {
        "models": models,
        "recipe": recipe,
        "runs": int(ev["runs"]),
        "whole_dataset": bool(ev["whole_dataset"]),
        "whole_recipe": EvalRecipe(**{**recipe.__dict__, "epochs": int(ev["whole_epochs"])}),
        "cache_dir": Path(ev["cache_dir"]).expanduser() if ev["cache_dir"] else None,
        "ranking": ev["ranking"],
    }


def _eval_count(syn: SyntheticSet, settings: dict[str, Any]) -> int:
    """Models :func:`evaluate_synthetic` trains (for the progress bar)."""
    soft = syn.soft_labels is not None
    teacher = soft and "teacher" in syn.metadata
    per_model = 2 + soft + teacher
    ranking = soft if settings["ranking"] == "auto" else bool(settings["ranking"])
    extra = 2 * (settings["ranking"] is True) + (settings["whole_dataset"] or ranking)
    return settings["runs"] * (per_model * len(settings["models"]) + extra)


def _load(cfg: dict[str, Any], name: str) -> DataBundle:
    data = cfg["data"]
    return load_dataset(name, root=data["root"], val_fraction=float(data["val_fraction"]))


def _evaluate(syn: SyntheticSet, bundle: DataBundle, cfg: dict[str, Any], run: RunDir, device: torch.device) -> dict:
    settings = eval_settings(cfg)
    total = _eval_count(syn, settings)
    start = time.perf_counter()
    with progress_bars() as bars:
        task = bars.add_task("evaluating", total=total, info="")

        def on_model(label: str, done: int, runs: int) -> None:
            bars.update(task, advance=1, info=label)
            run.log("eval", model=label, run=done, runs=runs)

        res = evaluate_synthetic(syn, bundle, seed=int(cfg["seed"]), device=device, progress=on_model, **settings)
    res["eval_seconds"] = round(time.perf_counter() - start, 3)
    return res


def run_central(cfg: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Distill, save, evaluate and report one central run.

    Parameters
    ----------
    cfg
        Resolved ``central`` config: ``method``, ``dataset``, ``model``, ``eval``, ``ipc``, ``seed``,
        ``device``, ``init``, ``data``, ``checkpoint_every``, ``resume``, ``tracking``.
    out_dir
        Run directory (see :mod:`fedistill.reporting`).

    Returns
    -------
    dict
        The summary also written to ``summary.json``.
    """
    resume = cfg["resume"]
    if resume:
        cfg = resume_config(resume)
    run = RunDir(out_dir, resume=bool(resume))
    if resume and run.summary.get("status") == "done":
        raise CheckpointError(f"{out_dir} already finished (summary.json status: done); nothing to resume")
    with run.track(cfg):  # the tracker (tracking=...) gets the summary and artefacts however the run ends
        return _distill_and_evaluate(cfg, run)


def _distill_and_evaluate(cfg: dict[str, Any], run: RunDir) -> dict[str, Any]:
    resume = cfg["resume"]
    device = resolve_device(cfg["device"])
    bundle = _load(cfg, cfg["dataset"]["name"])
    method = dict(cfg["method"])
    name = method.pop("name")
    model = dict(cfg["model"])
    engine = build_engine(name, model=model.pop("name"), model_kwargs=model, **method)
    ipc, seed = int(cfg["ipc"]), int(cfg["seed"])
    ckpt = _checkpoint(engine, cfg, run.path) if int(cfg["checkpoint_every"] or 0) or resume else None
    run.update_summary(method=name, dataset=bundle.info.name, ipc=ipc, seed=seed, status="distilling")
    start = time.perf_counter()
    with progress_bars() as bars:
        task = bars.add_task(f"distilling ({name})", total=None, info="")

        def on_step(step: int, total: int, metrics: dict[str, float]) -> None:
            bars.update(task, completed=step, total=total, info=f"loss {metrics.get('loss', float('nan')):.4f}")
            run.log("distill", **{"iteration": step - 1, **metrics})  # the engine's own iteration wins

        request = DistillRequest(
            data=bundle.train, ipc=ipc, init=cfg["init"], seed=seed, device=device, progress=on_step, checkpoint=ckpt
        )
        syn = engine.run(request)
    distill_seconds = time.perf_counter() - start
    syn.metadata.pop("loss_history", None)
    syn.metadata.update(dataset=bundle.info.name, model=cfg["model"], distill_seconds=round(distill_seconds, 3))
    path = syn.save(run.path / "synthetic.safetensors")
    save_grid(syn, run.path / "synthetic.png")
    run.log("saved", path=str(path), images=len(syn), bytes=syn.nbytes())
    run.update_summary(
        distill_seconds=round(distill_seconds, 3), synthetic_path=str(path.resolve()), status="evaluating"
    )
    if "privacy" in syn.metadata:
        run.update_summary(privacy=privacy_summary(syn.metadata["privacy"]))
    res = _evaluate(syn, bundle, cfg, run, device)
    res["warnings"] = result_warnings(res, bundle.info.num_classes, name)
    summary = run.update_summary(**res, status="done")
    run.log("summary", accuracy=res["accuracy"], random_subset=res["baselines"]["random_subset"])
    _print_table(summary)
    print(run_line(run.path, f"test accuracy {res['accuracy']['mean']:.2f}%"))
    return summary


def result_warnings(res: dict[str, Any], num_classes: int, method: str) -> list[str]:
    """What a user must be told about an evaluated set: at chance level, or below a same-size real subset.

    The comparison with the random real subset uses the validation split (never the test
    set); a soft-label set is compared with the random subset relabelled by the same
    teacher when that baseline was trained.
    """
    out = []
    chance = chance_warning(
        res["accuracy"]["mean"],
        num_classes,
        what=f"the model trained on the {method} set",
        why="the synthetic set taught it nothing; see the distillation loss in metrics.jsonl",
    )
    if chance:
        out.append(chance)
    val = res["accuracy"].get("val")
    for key, name in (("random_subset", "random real subset"), ("random_subset_soft", "teacher-relabelled subset")):
        base = res["baselines"].get(key, {}).get("val")
        if val is None or base is None:
            continue
        below = baseline_warning(
            val["mean"],
            base["mean"],
            what=f"on the validation split the {method} set",
            baseline_name=f"the {name} of the same size under the same recipe",
            fix=f"it adds nothing over real images; see configs/method/{method}.yaml for settings that work",
        )
        if below:
            out.append(below)
    return out


def _checkpoint(engine: Any, cfg: dict[str, Any], path: Path) -> Checkpoint:
    """The distillation checkpoint of a run (keyed by everything that determines the result)."""
    if not engine.takes("checkpoint"):
        raise CheckpointError(
            f"method={engine.name} does not checkpoint its distillation; resumable engines: "
            f"{', '.join(n for n in ENGINES.names() if ENGINES.get(n).takes('checkpoint'))} (set checkpoint_every=0)"
        )
    skip = ("resume", "checkpoint_every", "device", "eval", "tracking")
    key = config_key({k: v for k, v in cfg.items() if k not in skip})
    return Checkpoint(path / "distill_checkpoint.safetensors", key=key, every=int(cfg["checkpoint_every"] or 0))


def run_evaluate(cfg: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Re-evaluate a saved synthetic set (``cfg["synthetic_path"]``) into ``out_dir``."""
    syn = SyntheticSet.load(cfg["synthetic_path"])
    if not cfg.get("model"):  # no model=...: the set's own, as its run evaluated it
        recorded = syn.metadata.get("model")
        if not isinstance(recorded, dict) or "name" not in recorded:
            raise SyntheticSetError(
                "metadata", f"{cfg['synthetic_path']} records no model", "choose one: model=convnet model.width=32"
            )
        cfg = {**cfg, "model": recorded}
    run = RunDir(out_dir)
    device = resolve_device(cfg["device"])
    bundle = _load(cfg, syn.info.name)
    syn.validate(bundle.info)
    run.update_summary(
        method=syn.metadata.get("method"),
        dataset=syn.info.name,
        ipc=syn.metadata.get("ipc"),
        seed=int(cfg["seed"]),
        synthetic_path=str(Path(cfg["synthetic_path"]).resolve()),
        status="evaluating",
    )
    summary = run.update_summary(**_evaluate(syn, bundle, cfg, run, device), status="done")
    _print_table(summary)
    print(run_line(run.path, f"test accuracy {summary['accuracy']['mean']:.2f}%"))
    return summary


def _print_table(summary: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    console.print(results_table(summary))
    if "privacy" in summary:
        console.print(privacy_line(summary["privacy"]))
    rdm_soft, teacher = summary["baselines"].get("random_subset_soft"), summary.get("teacher")
    if rdm_soft:
        console.print(f"random subset relabelled by the same teacher: {rdm_soft['mean']:.2f} ± {rdm_soft['std']:.2f}")
    if teacher:
        console.print(f"teacher {teacher['arch']} ({teacher['epochs']} epochs): test accuracy {teacher['test']:.2f}")
    if "ranking" in summary:
        r = summary["ranking"]
        ars = f", ARS {r['ars']['ars']:.2f}" if "ars" in r else " (ARS: eval.ranking=true)"
        console.print(f"DD-Ranking: LRS {r['lrs']['lrs']:.2f}{ars} (percent)")
    for warning in summary.get("warnings", []):
        print(f"fedistill: warning: {warning}")
