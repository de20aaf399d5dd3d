"""Hostile clients as simulation-only wrappers (``clients.simulation:app``; ``attack`` config group).

The server names each planned attacker's ``attack`` in its task; the production handlers never
read it. The simulation's ClientApp acts it out in two places, with the library's attacks
(:data:`fedistill.federated.attacks.ATTACKS`):

- :func:`attacked_data` is the app's data loader: a ``before`` attack (``label_flip``,
  ``backdoor``) poisons the node's real data before any handler sees it;
- :func:`attack_mod` rewrites the reply: an ``after`` attack (``syn_label_flip``, ``duplicate``,
  ``noise``) the uploaded synthetic set, a ``stats`` attack (``stats_poison``) FedAF's class
  statistics (a ``query.stats`` reply, or the ones riding on a ``train.distill`` reply).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from clients.app import error_reply, node_data, planned_task
from clients.faults import replace_payload
from fedistill.data import dataset_info
from fedistill.data.base import Split
from fedistill.data.synthetic import SyntheticSet
from fedistill.federated import encode_synthetic
from fedistill.federated.attacks import ATTACKS, Attack, poison_split
from protocol.records import read_json, read_metrics, read_tensors, tensor_record

__all__ = ["attack_mod", "attacked_data"]


def attacked_data(node_config: Mapping[str, Any], task: Mapping[str, Any]) -> Split:
    """The node's data (:func:`clients.app.node_data`) after the task's ``before`` attack, if any."""
    return poison_split(node_data(node_config, task), task.get("attack"), int(task["seed"]))


def _poison_set(reply: Message, attack: Mapping[str, Any], steps: Attack, task: Mapping[str, Any]) -> None:
    """Rewrite the reply's synthetic set with the attack's ``after`` step, recounting rows and bytes."""
    tensors = read_tensors(reply.content.array_records["synthetic"])
    info = dataset_info(task["data"]["dataset"])  # the run's dataset: no data to load
    meta = read_json(reply, "meta", "json")
    syn = SyntheticSet(tensors["images"], tensors.get("labels"), info, tensors.get("soft_labels"), metadata=meta)
    poisoned, _ = encode_synthetic(steps.after(syn, attack))
    replace_payload(reply, "synthetic", poisoned, read_metrics(reply))


def attack_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Rewrite a planned attacker's reply with its ``after`` or ``stats`` attack (see the module docstring)."""
    task = planned_task(msg)
    attack = None if task is None else task.get("attack")  # absent on every honest client
    reply = call_next(msg, context)
    if not attack or reply.has_error():
        return reply
    arrays = reply.content.array_records
    try:
        steps = ATTACKS.get(str(attack["kind"]))  # only the steps this attack has touch the reply
        if steps.after is not None and "synthetic" in arrays:
            _poison_set(reply, attack, steps, task)
        if steps.stats is not None and "stats" in arrays:
            reply.content["stats"] = tensor_record(steps.stats(read_tensors(arrays["stats"]), attack))
    except Exception as err:  # an attack that cannot apply is the client's error, never the run's
        return error_reply(msg, f"{type(err).__name__}: {err}")
    return reply
