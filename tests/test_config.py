"""Typed config validation: invalid values fail in the CLI before Hydra makes a run directory and before
Ray or Flower start; every default is stated once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedistill.config import SCHEMAS, ConfigError, compose_config, hydra_error_line, validate_config

ROOT = Path(__file__).resolve().parents[1]

# (command, override, the key the error must name)
BAD = [
    ("simulate", "clients=0", "clients"),
    ("simulate", "alpha=-1", "alpha"),
    ("central", "ipc=0", "ipc"),
    ("simulate", "strategy.fraction=1.5", "strategy.fraction"),
    ("simulate", "rounds=-2", "rounds"),
    ("simulate", "no_such_key=1", "no_such_key"),
    ("simulate", "clients=abc", "clients"),
    ("central", "method.iterations=0", "method.iterations"),
    ("simulate", "+faults.12=crash", "faults.12"),
]


def test_the_cli_refuses_invalid_configs_in_one_line_before_any_run_dir(tmp_path):
    """Each bad override exits 2 with one line naming the key, before Hydra makes a run
    directory and before Ray or Flower is imported: the processes run with stand-in packages of
    those names that fail on import, so reaching them would be a traceback. (Composing imports
    torch: the groups' defaults are the engines' config dataclasses, see fedistill/config_store.py.)"""
    poison = tmp_path / "poison"
    for name in ("ray", "flwr"):
        (poison / name).mkdir(parents=True)
        (poison / name / "__init__.py").write_text(f"raise ImportError('{name} imported before validation')\n")
    path = [str(poison), str(ROOT), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    procs = []
    for i, (command, override, _) in enumerate(BAD):  # in parallel: each is an interpreter start
        run_dir = tmp_path / f"case{i}" / "run"
        argv = [sys.executable, "-m", "fedistill.cli", command, override, f"hydra.run.dir={run_dir}"]
        procs.append(
            (run_dir, subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        )
    for (command, override, key), (run_dir, proc) in zip(BAD, procs, strict=True):
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        stderr = err.decode()
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2, (override, stderr)
        assert "Traceback" not in stderr, stderr
        assert lines and lines[-1].startswith(f"fedistill {command}: error: "), stderr
        assert key in lines[-1], (override, lines[-1])
        assert not run_dir.exists(), f"{override}: Hydra created {run_dir}"


def test_the_default_configs_are_valid():
    for name in SCHEMAS:
        typed = validate_config(name, compose_config(name, []))
        assert typed is not None and typed.seed == 0
    typed = validate_config("simulate", compose_config("simulate", ["strategy=feddm", "clients=100", "alpha=0.1"]))
    assert (typed.clients, typed.alpha, typed.strategy.name, typed.rounds) == (100, 0.1, "feddm", 5)
    assert typed.rounds == typed.strategy.rounds  # rounds is ${strategy.rounds}
    assert validate_config("evaluate", {"anything": 1}) is None  # commands without a schema are not checked


@pytest.mark.parametrize(
    ("name", "overrides", "key"),
    [
        ("simulate", ["clients=0"], "clients"),
        ("simulate", ["clients=3.0"], "clients"),
        ("simulate", ["clients=true"], "clients"),
        ("simulate", ["seed=-1"], "seed"),
        ("simulate", ["strategy.min_success_fraction=1.5"], "strategy.min_success_fraction"),
        ("simulate", ["strategy.fraction=0"], "strategy.fraction"),
        ("simulate", ["strategy.round_timeout=0"], "strategy.round_timeout"),
        ("simulate", ["strategy.wait_timeout=-1", "strategy=dynafed"], "strategy.wait_timeout"),
        ("simulate", ["client.num_cpus=0"], "client.num_cpus"),
        ("simulate", ["client.num_gpus=-0.5"], "client.num_gpus"),
        ("simulate", ["data.val_fraction=1.0"], "data.val_fraction"),
        ("simulate", ["init=zeros"], "init"),
        ("simulate", ["attack.fraction=1.5"], "attack.fraction"),
        ("simulate", ["attack.poison_rate=-0.1"], "attack.poison_rate"),
        ("simulate", ["attack.trigger_size=0"], "attack.trigger_size"),
        ("simulate", ["strategy.count_share=1.5", "strategy=dp_stats"], "strategy.count_share"),
        ("simulate", ["strategy.secure_threshold=0", "strategy=dp_stats"], "strategy.secure_threshold"),
        ("central", ["ipc=abc"], "ipc"),
        ("central", ["seed=-3"], "seed"),
        ("central", ["data.val_fraction=-0.1"], "data.val_fraction"),
        # the selectable groups' keys (GROUP_RULES), wherever the chosen option has them
        ("central", ["model.width=0"], "model.width"),
        ("central", ["model.depth=0"], "model.depth"),
        ("central", ["model.norm=layer"], "model.norm"),
        ("simulate", ["model.width=-4", "model=lenet"], "model.width"),
        ("central", ["method.iterations=0"], "method.iterations"),
        ("central", ["method.lr_img=0", "method=mtt"], "method.lr_img"),
        ("simulate", ["method.epsilon=0", "method=dp_dm"], "method.epsilon"),
        ("central", ["method.delta=1.5", "method=dp_dc"], "method.delta"),
        ("central", ["method.releases=0"], "method.releases"),
        ("simulate", ["policy.threshold=-1", "policy=screen"], "policy.threshold"),
        ("simulate", ["policy.budget_ipc=0", "policy=redistill"], "policy.budget_ipc"),
        ("simulate", ["defense.trim_beta=0.6", "defense=trimmed_mean"], "defense.trim_beta"),
        ("simulate", ["defense.krum_malicious=-1", "defense=krum"], "defense.krum_malicious"),
        ("central", ["eval.epochs=0"], "eval.epochs"),
        ("central", ["eval.runs=abc"], "eval.runs"),
    ],
)
def test_bad_values_name_the_key_value_range_and_a_fix(name, overrides, key):
    cfg = compose_config(name, overrides)
    with pytest.raises(ConfigError) as info:
        validate_config(name, cfg)
    message = str(info.value)
    value = overrides[0].split("=", 1)[1]
    assert "\n" not in message
    assert message.startswith(f"{key}=")
    assert f"{key} must be" in message and "e.g. " in message, message
    assert value.rstrip("0").rstrip(".") in message or value in message


def test_dp_stats_cross_key_rules_are_refused_up_front():
    """method=dp_dm is needed; SecAgg+ needs two sampled clients (turning it off, or more clients, passes)."""
    with pytest.raises(ConfigError, match=r"^method=dm: strategy=dp_stats .* needs method=dp_dm"):
        validate_config("simulate", compose_config("simulate", ["strategy=dp_stats", "method=dm"]))
    with pytest.raises(ConfigError, match=r"^strategy.secure_aggregation=true needs at least 2 sampled clients"):
        validate_config(
            "simulate", compose_config("simulate", ["strategy=dp_stats", "clients=4", "strategy.fraction=0.25"])
        )
    for ok in (["clients=1", "strategy.secure_aggregation=false"], ["clients=2"]):
        typed = validate_config("simulate", compose_config("simulate", ["strategy=dp_stats", *ok]))
        assert typed.strategy.name == "dp_stats" and 0 < typed.strategy.count_share < 1


def test_edges_of_the_ranges_pass():
    for overrides in (
        ["strategy.fraction=1", "strategy.min_success_fraction=0", "data.val_fraction=0", "client.num_gpus=0"],
        ["alpha=1", "clients=1", "rounds=1", "client.num_cpus=0.5", "init=noise"],
    ):
        validate_config("simulate", compose_config("simulate", overrides))


def test_a_group_given_as_a_value_and_a_missing_key_are_config_errors():
    cfg = compose_config("simulate", [])
    with pytest.raises(ConfigError, match=r"^strategy=oneshot: strategy must be a group"):
        validate_config("simulate", {**cfg, "strategy": "oneshot"})
    with pytest.raises(ConfigError, match=r"^clients is missing"):
        validate_config("simulate", {k: v for k, v in cfg.items() if k != "clients"})


def test_hydra_errors_become_one_line():
    from hydra.errors import HydraException

    for overrides, expected in (
        (["no_such_key=1"], "no_such_key"),
        (["strategy=nope"], "fedavg"),  # the valid choices
        (["clients=[1"], "[1"),
    ):
        with pytest.raises(HydraException) as info:
            compose_config("simulate", overrides)
        line = hydra_error_line(info.value)
        assert "\n" not in line and expected in line, line
        assert "Config search path" not in line


def test_client_device_cuda_needs_a_gpu_share():
    with pytest.raises(ConfigError, match=r"client\.num_gpus"):
        validate_config("simulate", compose_config("simulate", ["client.device=cuda"]))
    with pytest.raises(ConfigError, match=r"client\.device"):
        validate_config("simulate", compose_config("simulate", ["client.device=tpu"]))
    typed = validate_config("simulate", compose_config("simulate", ["client.device=cuda", "client.num_gpus=0.1"]))
    assert typed.client.device == "cuda"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["+faults.12=crash"],
            "faults.12=crash: no client has partition id 12 with clients=10; "
            "give an id in [0, 10) or a fraction of clients, e.g. +faults.crash=0.2",
        ),
        (
            ["+faults.crash=1.5"],
            "faults.crash=1.5: faults.crash is the fraction of clients with fault crash and must be a number "
            "in [0, 1] (or a partition id as the key); e.g. +faults.crash=0.2",
        ),
        (["+faults.slow=-0.1"], "faults.slow=-0.1: faults.slow is the fraction of clients with fault slow"),
        (["+faults.crash=nan"], "faults.crash=nan: faults.crash is the fraction"),
        (
            ["+faults.crash=0.6", "+faults.nan=0.5"],
            "faults: the fractions of clients sum to 1.1, but a client gets at most one fault; "
            "lower them to a sum of at most 1",
        ),
        (["+faults.start_round=0"], "faults.start_round=0: faults.start_round must be an integer >= 1"),
        (["+faults.slow_seconds=0"], "faults.slow_seconds=0: faults.slow_seconds must be a number > 0"),
        (["faults=3"], "faults=3: faults must be a group of keys"),
    ],
)
def test_faults_are_checked_before_the_run_starts(overrides, message):
    """Partition ids below ``clients``, fractions in [0, 1] summing to at most 1, options in range."""
    cfg = compose_config("simulate", overrides)
    with pytest.raises(ConfigError) as err:
        validate_config("simulate", cfg)
    assert str(err.value).startswith(message), str(err.value)


def test_faults_that_fit_the_federation_pass_with_their_options():
    from fedistill.config_faults import check_faults

    ok = ["clients=4", "+faults.3=nan", "+faults.crash=0.5", "+faults.slow=0.5", "+faults.start_round=2"]
    cfg = compose_config("simulate", ok)
    validate_config("simulate", cfg)
    assert check_faults(cfg).start_round == 2 and check_faults(cfg).slow_seconds == 3.0
    assert check_faults(compose_config("simulate", ["+faults.slow_seconds=0.5"])).slow_seconds == 0.5


def _option_files() -> list[tuple[str, Path]]:
    return [(g, p) for g in ("method", "policy", "defense") for p in sorted((ROOT / "configs" / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "path"), _option_files(), ids=lambda v: getattr(v, "stem", v))
def test_a_group_option_restates_no_code_default(group, path):
    """Every default of an engine, policy or defence is stated once, in its code: the YAML option
    extends the registered code defaults and holds only keys the code has no default for, or
    whose value the command line deliberately changes."""
    import yaml

    from fedistill.config_store import group_defaults

    raw = yaml.safe_load(path.read_text())
    name = path.stem
    code = {(g, n): d for g, n, d in group_defaults()}[(group, name)]
    assert raw["defaults"][0] == f"/defaults/{group}/{name}@_here_", path
    restated = {k: v for k, v in raw.items() if k != "defaults" and k in code and code[k] == v}
    assert not restated, f"{path.name} restates the code's defaults {restated}"


def test_the_training_recipe_is_stated_once_for_evaluation_and_every_server():
    """``eval`` and the strategies' ``server`` block extend EvalRecipe's defaults; their YAML states
    only what differs (the server's batch and step cap), and composing gives the recipe's fields."""
    import dataclasses

    import yaml

    from fedistill.training import EvalRecipe

    recipe = dataclasses.asdict(EvalRecipe())
    files = {
        "eval/default.yaml": lambda raw: raw,
        "strategy_base/server.yaml": lambda raw: raw["server"],
        "strategy/feddm.yaml": lambda raw: raw["server"],
        "strategy/fedaf.yaml": lambda raw: raw["server"],
    }
    for name, block in files.items():
        values = block(yaml.safe_load((ROOT / "configs" / name).read_text()))
        restated = {k: v for k, v in values.items() if k in recipe and recipe[k] == v}
        assert not restated, f"{name} restates EvalRecipe's defaults {restated}"
    server = compose_config("simulate", [])["strategy"]["server"]
    assert set(server) == set(recipe) and server["batch_size"] == 64 and server["lr"] == recipe["lr"]
    evaluation = compose_config("central", [])["eval"]
    assert {k: evaluation[k] for k in recipe} == {**recipe, "soft_lr": 0.1}  # the one key the YAML chooses


def test_composing_a_group_option_gives_the_code_defaults_and_follows_them(monkeypatch):
    """``method=X`` composes to the engine config's defaults (nothing from the YAML on Fashion-MNIST,
    where no dataset preset applies); a changed code default is what the next composition gives."""
    from fedistill.config_store import engine_defaults, function_defaults
    from fedistill.engines import ENGINES
    from fedistill.engines.dm_config import DMConfig
    from fedistill.federated.policies import POLICIES

    for name in ENGINES.names():
        cfg = compose_config("central", [f"method={name}", "dataset=fashion_mnist"])
        assert cfg["method"] == engine_defaults(name), name
    screen = compose_config("simulate", ["policy=screen"])["policy"]
    assert screen == function_defaults("screen", POLICIES.get("screen")) and screen["threshold"] == 3.5
    import yaml  # DynaFed's server distillation extends the mtt group: it states only its choices

    choices = yaml.safe_load((ROOT / "configs" / "strategy" / "dynafed.yaml").read_text())["distill"]
    assert choices and all(engine_defaults("mtt")[k] != v for k, v in choices.items())
    distill = compose_config("simulate", ["strategy=dynafed"])["strategy"]["distill"]
    assert distill == {**engine_defaults("mtt"), **choices}
    field = DMConfig.__dataclass_fields__["iterations"]
    monkeypatch.setattr(field, "default", 77)
    assert compose_config("central", ["dataset=fashion_mnist"])["method"]["iterations"] == 77
