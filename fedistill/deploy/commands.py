"""``fedistill deploy <certs|node-data> ...``: the helpers of docs/deploy.md on the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["SUBCOMMANDS", "main"]


def _certs(args: list[str]) -> int:
    from fedistill.deploy.certs import DEFAULT_HOSTS, make_certs

    p = argparse.ArgumentParser(
        prog="fedistill deploy certs",
        description="Write a CA, the SuperLink's TLS certificate and SuperNode key pairs (OpenSSH, EC SECP384R1).",
    )
    p.add_argument("out_dir")
    p.add_argument(
        "--host",
        action="append",
        dest="hosts",
        help=f"host name or IP the SuperLink is reached at (repeat; default: {' '.join(DEFAULT_HOSTS)})",
    )
    p.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to write (default 3)")
    p.add_argument("--days", type=int, default=365, help="certificate validity (default 365)")
    ns = p.parse_args(args)
    paths = make_certs(ns.out_dir, hosts=ns.hosts or DEFAULT_HOSTS, nodes=ns.nodes, days=ns.days)
    print(f"CA               {paths['ca']}  (keep {paths['ca_key']} offline)")
    print(f"SuperLink cert   {paths['server_cert']}  key {paths['server_key']}  SANs {ns.hosts or list(DEFAULT_HOSTS)}")
    for key in paths["node_keys"]:
        print(f"SuperNode key    {key}  public {key}.pub")
    return 0


def _node_data(args: list[str]) -> int:
    from fedistill.config import compose_config, validate_config
    from fedistill.deploy.nodedata import FORMATS, write_partitions

    p = argparse.ArgumentParser(
        prog="fedistill deploy node-data",
        description="Write partitions of a dataset as SuperNode data-paths, split as `fedistill simulate` "
        "splits them for the same overrides (e.g. dataset=fashion_mnist clients=3 partition=iid).",
    )
    p.add_argument("out_dir")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the simulate config")
    p.add_argument("--format", choices=FORMATS, default="npz", help="file format (default npz)")
    p.add_argument("--node", type=int, action="append", help="only this partition id (repeat)")
    ns = p.parse_args(args)
    from hydra.errors import HydraException

    try:
        cfg = compose_config("simulate", ns.overrides)
        validate_config("simulate", cfg)
        paths = write_partitions(ns.out_dir, cfg, fmt=ns.format, nodes=ns.node)
    except (ValueError, OSError, HydraException) as err:  # bad override or value, dataset missing, format mismatch
        print(f"fedistill deploy node-data: error: {err}", file=sys.stderr)
        return 1
    for i, path in zip(ns.node or range(int(cfg["clients"])), paths, strict=True):
        # partition-id is optional on a device: a stable client key (and seed) across runs
        print(f"node {i}: --node-config 'data-path=\"{path.resolve()}\" partition-id={i}'")
    return 0


SUBCOMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "certs": ("CA, SuperLink certificate and SuperNode keys", _certs),
    "node-data": ("write dataset partitions as SuperNode data-paths", _node_data),
}


def main(args: list[str]) -> int:
    """Dispatch ``fedistill deploy <subcommand> ...``; returns the exit code."""
    if not args or args[0] in ("-h", "--help", "help") or args[0] not in SUBCOMMANDS:
        lines = ["usage: fedistill deploy <subcommand> ...   (docs/deploy.md)", ""]
        lines += [f"  {name:10s} {SUBCOMMANDS[name][0]}" for name in SUBCOMMANDS]
        bad = bool(args) and args[0] not in ("-h", "--help", "help")
        print("\n".join(lines), file=sys.stderr if bad else sys.stdout)
        return 2 if bad else 0
    return SUBCOMMANDS[args[0]][1](args[1:])
