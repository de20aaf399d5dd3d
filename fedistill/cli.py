"""Command-line entry point: ``fedistill <command> [hydra overrides]``.

Commands are registered by name; each is a Hydra app over the config tree in
``configs/`` (shipped inside the wheel as ``fedistill/_configs``). Heavy imports
(torch, and Flower for the federated commands) happen lazily per command.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from fedistill.registry import Registry, UnknownNameError

__all__ = ["COMMANDS", "compose_config", "config_dir", "main"]

COMMANDS: Registry[tuple[str, Callable[[list[str]], int]]] = Registry("command")


def config_dir() -> Path:
    """The Hydra config tree: packaged copy first, then the source checkout's ``configs/``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_configs", here.parent / "configs"):
        if (cand / "central.yaml").is_file():
            return cand
    raise FileNotFoundError(f"fedistill config tree not found in {here / '_configs'} or {here.parent / 'configs'}")


def _hydra_app(config_name: str, task: Callable[[dict, Path], object], prog: str, args: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    def job(cfg: DictConfig) -> None:
        from fedistill.checkpoint import CheckpointError
        from fedistill.data import DatasetFormatError, DatasetNotFoundError, SyntheticSetError
        from fedistill.federated import FederationError, NodeDataError
        from fedistill.privacy import BudgetExceededError
        from fedistill.privacy.audit import RunDirError
        from fedistill.reporting import RunDir

        out = Path(HydraConfig.get().runtime.output_dir)
        if not cfg.get("resume"):  # a resumed run keeps the config.yaml it was started with
            RunDir(out).write_config(OmegaConf.to_yaml(cfg, resolve=True))
        try:
            task(OmegaConf.to_container(cfg, resolve=True), out)  # type: ignore[arg-type]
        except (
            DatasetNotFoundError,
            DatasetFormatError,
            SyntheticSetError,
            UnknownNameError,
            FederationError,
            NodeDataError,
            BudgetExceededError,
            RunDirError,
            CheckpointError,
        ) as exc:
            # input errors carry their own explanation and fix: no traceback
            print(f"fedistill {config_name}: error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None

    job.__module__ = f"fedistill.{config_name}"
    app = hydra.main(config_path=str(config_dir()), config_name=config_name, version_base="1.3")(job)
    saved = sys.argv
    sys.argv = [prog, *args]
    try:
        app()
    finally:
        sys.argv = saved
    return 0


def compose_config(config_name: str, overrides: list[str]) -> dict:
    """Resolve a config of the tree with Hydra overrides, without running a job (for ServerApps)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _resume_args(args: list[str], command: str) -> list[str] | None:
    """``resume=RUN_DIR`` alone -> run in RUN_DIR with its own config (``None``: usage error)."""
    resume = [a for a in args if a.startswith("resume=")]
    if not resume:
        return args
    others = [a for a in args if a not in resume and not a.startswith("device=")]
    if others:
        print(
            f"fedistill {command}: resume=RUN_DIR continues a run with its own config.yaml; drop the other "
            f"overrides {others}",
            file=sys.stderr,
        )
        return None
    return [*args, f"hydra.run.dir={resume[-1].split('=', 1)[1]}"]


def _central(args: list[str]) -> int:
    from fedistill.central import run_central

    argv = _resume_args(args, "central")
    return 2 if argv is None else _hydra_app("central", run_central, "fedistill central", argv)


def _positional(args: list[str], key: str, usage: str) -> list[str] | None:
    """Turn the one positional argument into the override ``key='PATH'`` (``None``: usage error)."""
    paths = [a for a in args if "=" not in a and not a.startswith("-")]
    if len(paths) != 1:
        print(f"usage: {usage}", file=sys.stderr)
        return None
    rest = [a for a in args if a is not paths[0]]
    quoted = paths[0].replace("\\", "\\\\").replace("'", "\\'")
    return [f"{key}='{quoted}'", *rest]


def _evaluate(args: list[str]) -> int:
    from fedistill.central import run_evaluate

    argv = _positional(args, "synthetic_path", "fedistill evaluate PATH/TO/synthetic.safetensors [overrides...]")
    return 2 if argv is None else _hydra_app("evaluate", run_evaluate, "fedistill evaluate", argv)


def _audit(args: list[str]) -> int:
    from fedistill.privacy.audit import run_audit

    argv = _positional(args, "run_dir", "fedistill audit RUN_DIR [audit overrides...]")
    return 2 if argv is None else _hydra_app("audit", _print_audit(run_audit), "fedistill audit", argv)


def _print_audit(run: Callable[[dict, Path], dict]) -> Callable[[dict, Path], dict]:
    def task(cfg: dict, out: Path) -> dict:
        from fedistill.privacy.report import audit_table

        result = run(cfg, out)
        from rich.console import Console

        Console().print(audit_table(result))
        print(f"audit written to {out / 'audit.json'} and {out / 'audit.png'}")
        return result

    return task


def _simulate(args: list[str]) -> int:
    from strategies.simulation import run_simulate

    argv = _resume_args(args, "simulate")
    return 2 if argv is None else _hydra_app("simulate", run_simulate, "fedistill simulate", argv)


def _deploy(args: list[str]) -> int:
    from fedistill.deploy.commands import main as deploy_main

    return deploy_main(args)


COMMANDS.register("simulate")(("federated distillation with Flower's simulation engine on Ray", _simulate))
COMMANDS.register("central")(("distill a dataset on one machine and evaluate it", _central))
COMMANDS.register("evaluate")(("re-evaluate a saved synthetic.safetensors", _evaluate))
COMMANDS.register("audit")(("membership-inference audit of a run's synthetic set", _audit))
COMMANDS.register("deploy")(("certificates, keys and node data for a real SuperLink (docs/deploy.md)", _deploy))


def _usage() -> str:
    lines = ["usage: fedistill <command> [hydra overrides...]   (fedistill <command> --help for options)", ""]
    lines += [f"  {name:10s} {COMMANDS.get(name)[0]}" for name in COMMANDS.names()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``fedistill <command> ...``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"fedistill: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return COMMANDS.get(argv[0])[1](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
