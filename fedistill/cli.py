"""Command-line entry point: ``fedistill <command> [hydra overrides]``.

Commands are registered by name; each is a Hydra app over the config tree in
``configs/`` (shipped inside the wheel as ``fedistill/_configs``), except ``report`` and
``deploy`` (plain argparse). Heavy imports (torch, and Flower for the federated commands)
happen lazily per command.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from fedistill.config import ConfigError, compose_config, config_dir, hydra_error_line, validate_config
from fedistill.config_store import register_defaults
from fedistill.registry import Registry, UnknownNameError

__all__ = ["COMMANDS", "compose_config", "config_dir", "main"]

COMMANDS: Registry[tuple[str, Callable[[list[str]], int]]] = Registry("command")


def _hydra_app(
    config_name: str, task: Callable[[dict, Path], object], prog: str, args: list[str], *, resumable: bool = False
) -> int:
    """Run ``task(resolved config, run directory)`` as the Hydra app ``prog`` over ``args``.

    An input error ends with one line on stderr and, as the last line, the run directory
    (with the ``resume=`` command that continues it, for a ``resumable`` command whose
    unfinished run left a checkpoint).
    """
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
        from fedistill.tracking import TrackingError

        out = Path(HydraConfig.get().runtime.output_dir)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if not cfg.get("resume"):  # a resumed run keeps the config.yaml it was started with
            try:  # checked again here: sweeps (-m) and Hydra flags skip the check before the job
                validate_config(config_name, resolved)  # type: ignore[arg-type]
            except ConfigError as exc:
                print(f"fedistill {config_name}: error: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            RunDir(out).write_config(OmegaConf.to_yaml(cfg, resolve=True))
        try:
            task(resolved, out)  # type: ignore[arg-type]
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
            TrackingError,
        ) as exc:
            # input errors carry their own explanation and fix: no traceback
            print(f"fedistill {config_name}: error: {exc}", file=sys.stderr)
            print(_failed_line(config_name, out, resumable=resumable))
            raise SystemExit(1) from None

    job.__module__ = f"fedistill.{config_name}"
    register_defaults()  # the groups' code defaults, which their YAML options extend
    app = hydra.main(config_path=str(config_dir()), config_name=config_name, version_base="1.3")(job)
    saved = sys.argv
    sys.argv = [prog, *args]
    try:
        app()
    finally:
        sys.argv = saved
    return 0


def _failed_line(command: str, out: Path, *, resumable: bool) -> str:
    """The last line of a run that failed in ``out``: the directory, and how to continue it when it can be."""
    from fedistill.checkpoint import CheckpointError
    from fedistill.reporting import RunDir, run_line

    try:
        unfinished = RunDir(out, resume=True).summary.get("status") != "done"
    except CheckpointError:  # a damaged summary.json, which resume refuses too
        unfinished = False
    if resumable and unfinished and any(out.glob("*checkpoint.safetensors")):
        return run_line(out, f"failed; continue from its checkpoint: fedistill {command} resume={out.resolve()}")
    return run_line(out, "failed")


def _precheck(command: str, args: list[str]) -> int | None:
    """Compose and validate the config of ``args`` before Hydra runs the job (``2``: invalid).

    So an invalid value or unknown key fails in a second with one line on stderr, before
    Hydra creates a run directory and before Ray or Flower start. Skipped for a
    resumed run (its own config.yaml is used), for Hydra flags (``--help``, ``--cfg job``,
    ``-m`` sweeps: each job of a sweep is checked when it starts) and for commands
    without a typed schema.
    """
    from fedistill.config import SCHEMAS

    if command not in SCHEMAS or any(a.startswith(("-", "resume=")) for a in args):
        return None
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        validate_config(command, compose_config(command, args))
    except ConfigError as exc:
        message = str(exc)
    except (HydraException, OmegaConfBaseException) as exc:  # unknown key or choice, bad override syntax
        message = hydra_error_line(exc)
    else:
        return None
    print(f"fedistill {command}: error: {message}", file=sys.stderr)
    return 2


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
    argv = _resume_args(args, "central")
    if argv is None or _precheck("central", argv):
        return 2
    from fedistill.central import run_central

    return _hydra_app("central", run_central, "fedistill central", argv, resumable=True)


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
        from fedistill.privacy.report import audit_line, audit_table
        from fedistill.reporting import run_line

        result = run(cfg, out)
        from rich.console import Console

        Console().print(audit_table(result))
        for note in result.get("notes", []):
            print(f"fedistill audit: note: {note}")
        print(run_line(out, audit_line(result)))
        return result

    return task


def _simulate(args: list[str]) -> int:
    argv = _resume_args(args, "simulate")
    if argv is None or _precheck("simulate", argv):
        return 2
    from strategies.simulation import run_simulate

    return _hydra_app("simulate", run_simulate, "fedistill simulate", argv, resumable=True)


def _report(args: list[str]) -> int:
    """``fedistill report DIR [DIR...] [--out OUT]`` (plain argparse: it only reads run directories)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="fedistill report",
        description="Tables and plots of every central/simulate run under DIR..., grouped by config minus seed.",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="directories searched for run directories")
    parser.add_argument("--out", help="where report.md, report.csv and report.html go (default: the first DIR)")
    try:
        opts = parser.parse_args(args)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return int(exc.code or 0)
    from fedistill.report import ReportError, collect
    from fedistill.report_render import write_report

    try:
        report = collect(opts.dirs)
    except ReportError as exc:
        print(f"fedistill report: error: {exc}", file=sys.stderr)
        return 2
    out = opts.out or opts.dirs[0]
    try:
        paths = write_report(report, out, dirs=opts.dirs)
    except OSError as exc:
        print(
            f"fedistill report: error: cannot write into {out} ({exc}); pass --out with a writable directory",
            file=sys.stderr,
        )
        return 2
    print(f"wrote {paths['md']} and {paths['csv']}")
    print(
        f"report: {paths['html']} ({len(report.runs)} runs in {len(report.groups)} groups, "
        f"{len(report.incomplete)} failed or incomplete)"
    )
    return 0


def _deploy(args: list[str]) -> int:
    from fedistill.deploy.commands import main as deploy_main

    return deploy_main(args)


COMMANDS.register("simulate")(("federated distillation with Flower's simulation engine on Ray", _simulate))
COMMANDS.register("central")(("distill a dataset on one machine and evaluate it", _central))
COMMANDS.register("evaluate")(("re-evaluate a saved synthetic.safetensors", _evaluate))
COMMANDS.register("audit")(("membership-inference audit of a run's synthetic set", _audit))
COMMANDS.register("report")(("tables and plots of the runs under directories (docs/report.md)", _report))
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
