"""Deployment helpers without processes: certificates, node data, run config, the FAB, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from fedistill.cli import main
from fedistill.config import compose_config
from fedistill.deploy import hydra_overrides
from fedistill.deploy.certs import make_certs
from fedistill.deploy.loopback import run_config_arg
from fedistill.deploy.nodedata import write_node_data, write_partitions
from fedistill.federated import NodeDataError, node_split, partition_indices
from fedistill.federated.node import data_spec, node_task, read_node_data

ROOT = Path(__file__).resolve().parents[1]
DATA = {"dataset": "digits", "root": None, "val_fraction": 0.1, "partition": {"scheme": "iid"}, "seed": 0}


def test_certs_chain_sans_and_openssh_node_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    paths = make_certs(tmp_path, hosts=["localhost", "127.0.0.1", "superlink.example.org"], nodes=2)
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm))
    assert server.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example.org"}
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert len(paths["node_keys"]) == 2
    for key_path in paths["node_keys"]:
        private = load_ssh_private_key(key_path.read_bytes(), password=None)
        public = load_ssh_public_key(Path(f"{key_path}.pub").read_bytes())
        assert isinstance(private.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert Path(f"{key_path}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
        assert key_path.stat().st_mode & 0o077 == 0
    assert paths["ca_key"].stat().st_mode & 0o077 == 0 and paths["server_key"].stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "idx"])
def test_node_data_is_the_simulated_partition_in_every_format(digits, tmp_path, fmt):
    cfg = compose_config("simulate", ["clients=3", "partition=iid", "seed=0"])
    (path,) = write_partitions(tmp_path, cfg, fmt=fmt, nodes=[1])
    part = partition_indices(data_spec(cfg, "digits"), 3)[1]
    split = node_split({"data-path": str(path)}, DATA)
    expected = digits.train.subset(torch.from_numpy(part))
    assert torch.equal(split.labels, expected.labels)
    # uint8 quantization of the pixels: at most half a grey level, in normalized units
    assert torch.allclose(split.images, expected.images, atol=0.6 / 255 / digits.info.std[0])


def test_node_data_reads_a_cifar_batch_file_and_directory(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8), np.arange(6) % 10
    path = write_node_data(tmp_path / "data_batch_1", images, labels, fmt="cifar")
    for p in (path, tmp_path):
        x, y = read_node_data(p)
        assert np.array_equal(x, images) and np.array_equal(y, labels)
    split = node_split({"data-path": str(path)}, {**DATA, "dataset": "cifar10"})
    assert split.images.shape == (6, 3, 32, 32)


def test_node_data_errors_name_the_problem(tmp_path):
    with pytest.raises(NodeDataError, match="does not exist"):
        node_split({"data-path": str(tmp_path / "missing")}, DATA)
    with pytest.raises(NodeDataError, match="neither train-images-idx3-ubyte"):
        node_split({"data-path": str(tmp_path)}, DATA)
    np.savez(tmp_path / "f.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(NodeDataError, match=r"shape \(1, 28, 28\), the run's dataset 'digits' needs \(1, 8, 8\)"):
        node_split({"data-path": str(tmp_path / "f.npz")}, DATA)
    with pytest.raises(ValueError, match="one channel"):
        write_node_data(tmp_path / "x", np.zeros((2, 3, 8, 8), np.uint8), np.zeros(2, np.int64), fmt="idx")


def test_node_task_applies_the_nodes_limits():
    task = {"threads": 4, "device": "cuda", "seed": 1}
    assert node_task({"data-path": "/d"}, task) == {"threads": 4, "device": "cpu", "seed": 1}
    assert node_task({"data-path": "/d", "threads": 1, "device": "cuda"}, task)["threads"] == 1
    assert node_task({"partition-id": 0}, task) == task  # simulation: the server's task as is
    # max-memory-mb caps the process: a bigger allocation fails (an error reply, not an OOM kill)
    code = (
        "import torch; from fedistill.federated.node import node_task\n"
        "node_task({'max-memory-mb': 900}, {'device': 'cpu'})\n"
        "torch.zeros(64 * 2**20)\n"  # 256 MB fits
        "try:\n    torch.zeros(512 * 2**20)\nexcept RuntimeError as e:\n    print('refused', 'allocate' in str(e))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "refused True", out.stderr


def _app_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]


def test_run_config_keys_are_hydra_overrides_of_the_simulate_config():
    app = _app_config()
    assert app["components"] == {"serverapp": "strategies.app:app", "clientapp": "clients.app:app"}
    assert "federations" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]
    rc = dict(app["config"])
    cfg = compose_config("simulate", hydra_overrides(rc))
    assert (cfg["strategy"]["name"], cfg["method"]["name"], cfg["clients"], cfg["rounds"]) == ("oneshot", "dm", 3, 1)
    # an empty string keeps the Hydra default, so switching the strategy keeps its own rounds
    cfg = compose_config("simulate", hydra_overrides({**rc, "strategy": "feddm", "method.iterations": 7}))
    assert (cfg["rounds"], cfg["method"]["iterations"]) == (5, 7)
    assert hydra_overrides({"data.root": "/a b", "x": True, "run-dir": "/r", "node-data": "own"}) == [
        "data.root='/a b'",
        "x=true",
    ]
    assert run_config_arg({"clients": 3, "method.iterations": 5, "run-dir": "/r"}) == (
        'clients=3 "method.iterations"=5 run-dir="/r"'
    )


def test_the_simulation_loads_the_deployed_handlers_plus_fault_and_attack_mods_by_component_string():
    from flwr.clientapp import ClientApp

    from clients.attacks import attack_mod
    from clients.faults import fault_mod
    from strategies.simulation import CLIENT_APP, load_component

    deployed, simulated = load_component(_app_config()["components"]["clientapp"]), load_component(CLIENT_APP)
    assert isinstance(deployed, ClientApp) and isinstance(simulated, ClientApp)
    assert set(simulated._registered_funcs) == set(deployed._registered_funcs)  # the same message types
    assert deployed._mods == [] and simulated._mods == [fault_mod, attack_mod]  # never on a device


def test_fab_carries_the_packages_and_configs_only():
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist())
    for needed in (
        "clients/app.py",
        "strategies/app.py",
        "protocol/records.py",
        "fedistill/deploy/certs.py",
        "configs/simulate.yaml",
    ):
        assert needed in names
    assert "configs/strategy/oneshot.yaml" in names and "pyproject.toml" in names
    assert not [n for n in names if n.startswith(("tests/", ".venv/", "benchmarks/", "outputs/"))]


def test_deploy_cli(tmp_path, capsys):
    assert main(["deploy", "certs", str(tmp_path / "certs"), "--nodes", "1", "--host", "10.0.0.5"]) == 0
    assert (tmp_path / "certs" / "supernode-1.pub").is_file() and "10.0.0.5" in capsys.readouterr().out
    assert main(["deploy", "node-data", str(tmp_path / "nd"), "clients=2", "partition=iid", "--node", "1"]) == 0
    out = capsys.readouterr().out
    assert f"node 1: --node-config 'data-path=\"{tmp_path / 'nd' / 'node-1.npz'}\" partition-id=1'" in out
    assert not (tmp_path / "nd" / "node-0.npz").exists()
    assert main(["deploy", "node-data", str(tmp_path / "c"), "--format", "cifar"]) == 1
    assert "3x32x32" in capsys.readouterr().err
    assert main(["deploy", "nope"]) == 2
    assert main(["deploy"]) == 0


def test_the_docs_fashion_mnist_run_tells_the_server_where_the_dataset_is():
    """docs/deploy.md's ``flwr run`` example: every key is a run-config key and composes to what it says."""
    import itertools
    import shlex

    from docshell import shell_blocks
    from flwr.common.config import parse_config_args

    (script,) = shell_blocks(ROOT / "docs" / "deploy.md", "example").values()
    argv = shlex.split(script.replace("\\\n", " ").splitlines()[0])
    assert argv[:4] == ["flwr", "run", ".", "prod"]
    rc = parse_config_args([a for flag, a in itertools.pairwise(argv) if flag == "--run-config"])
    assert set(rc) <= set(_app_config()["config"])  # Flower refuses keys pyproject.toml does not list
    cfg = compose_config("simulate", hydra_overrides(rc))
    assert cfg["dataset"]["name"] == "fashion_mnist" and cfg["data"]["root"] == "/usr/share/datasets/fashion-mnist"
    assert rc["run-dir"] == "/srv/fedistill/run1"


def test_a_deployment_summary_records_the_nodes_own_data_not_the_unused_split():
    from strategies.app import data_summary

    cfg = compose_config("simulate", ["alpha=0.1"])
    assert data_summary(cfg, "own") == {"partition": {"scheme": "node-data"}}
    # simulated partitions (fedistill simulate, node-data="partition") keep recording the split
    assert data_summary(cfg, "partition") == {"alpha": 0.1, "partition": {"scheme": "dirichlet", "alpha": 0.1}}
