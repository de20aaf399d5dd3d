"""FedGen: a federated generator, then latent codes instead of pixels (FedDGM's payload idea)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedistill.engines.gen import CVAE, generator_digest, new_cvae
from fedistill.federated import ClientFailure, FederationError, weighted_average
from fedistill.federated.faults import LATENT_FAULTS
from fedistill.federated.generator import build_generator, decode_latent_payload, reconstruction_error
from fedistill.federated.server import state_problem
from fedistill.io import atomic_save_tensors, load_tensors
from fedistill.registry import UnknownNameError
from protocol.records import read_json, read_tensors, tensor_record
from strategies.base import Reply, register_strategy
from strategies.distill import DistillStrategy

__all__ = ["FedGen"]


@register_strategy("fedgen")
class FedGen(DistillStrategy):
    """Phase 1 (``gen_rounds`` rounds, ``train.generator``): clients train the server's
    conditional VAE for ``local_epochs`` on their data and the server averages the weights
    (FedAvg, by example count); ``generator_path`` loads a checkpoint instead and skips it.
    Phase 2 (one round, ``train.latents``): clients optimize latent codes through the frozen
    generator with ``method=gen`` and upload latents and labels only; the server validates
    and decodes them with the same generator, merges them and trains the global model.

    The ``method`` group (``gen``) gives the generator's shape and optimizer (``latent_dim``,
    ``hidden``, ``gen_lr``, ``beta``) and the latent optimization. ``summary.json`` reports
    ``uplink``: phase 2's bytes against the same decoded images sent as float32 pixels.
    Phase-1 rounds log the generator's test reconstruction error; the global model is
    trained only in phase 2 (its phase-1 accuracy is that of the untrained model).
    """

    name = "fedgen"
    continue_training = False
    checkpoint_attrs = (*DistillStrategy.checkpoint_attrs, "generator_state", "payload")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        method = dict(self.cfg["method"])
        if method["name"] != "gen":
            raise UnknownNameError(
                f"strategy=fedgen optimizes latent codes of a generator and needs method=gen "
                f"(got method={method['name']}); use strategy=oneshot for other engines"
            )
        self.arch = {
            "latent_dim": int(method["latent_dim"]),
            "hidden": int(method["hidden"]),
        }  # configs/method/gen.yaml
        self.gen_recipe = {"lr": float(method["gen_lr"]), "beta": float(method["beta"])}
        fresh = new_cvae(self.bundle.info, **self.arch, seed=self.seed).state_dict()
        path = self.opts["generator_path"]
        if path:
            self.generator_state = self._load_checkpoint(Path(str(path)), fresh)
            self.gen_rounds = 0
        else:
            self.generator_state = fresh
            self.gen_rounds = int(self.opts["gen_rounds"])
        self.rounds = self.gen_rounds + 1
        self.payload = {"latent": 0, "pixel": 0, "clients": 0}
        self.run.update_summary(rounds=self.rounds, gen_rounds=self.gen_rounds, generator_source=str(path or "fedavg"))

    def _load_checkpoint(self, path: Path, ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not path.is_file():
            raise FederationError(f"strategy.generator_path={path} does not exist (a safetensors CVAE state dict)")
        state = load_tensors(path)
        problem = state_problem(state, ref)
        if problem:
            raise FederationError(
                f"strategy.generator_path={path}: {problem}; method.latent_dim and method.hidden must match it"
            )
        return state

    @property
    def generator(self) -> CVAE:
        """The current generator (frozen, on the CPU)."""
        return build_generator(self.bundle.info, self.generator_state, **self.arch)

    def generator_phase(self, round_: int) -> bool:
        """Whether ``round_`` trains the generator (phase 1) rather than collecting latents."""
        return round_ <= self.gen_rounds

    def round_message_type(self, round_: int) -> str:
        """Phase 1 sends ``train.generator`` messages, phase 2 ``train.latents``."""
        return "train.generator" if self.generator_phase(round_) else "train.latents"

    def fault_kinds(self) -> list[str]:
        """FedGen clients misbehave in their latent codes (:data:`LATENT_FAULTS`)."""
        return LATENT_FAULTS.names()

    def configure(self, round_: int) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """The generator's local recipe (phase 1) or the ``gen`` engine task (phase 2), and its weights."""
        if self.generator_phase(round_):
            recipe = {**self.arch, **self.gen_recipe, "epochs": int(self.opts["local_epochs"])}
            return {"generator": recipe}, self.generator_state
        return self.engine_task(), self.generator_state

    def accept(self, round_: int, replies: list[Reply]) -> tuple[list[Reply], list[ClientFailure]]:
        """Check generator weights (phase 1) or validate and decode latent payloads (phase 2)."""
        self.round_empty = 0
        check = self._accept_generator if self.generator_phase(round_) else self._accept_latents()
        ok, bad = [], []
        for r in replies:
            problem = check(r)
            if problem:
                bad.append(ClientFailure(r.node, r.client, "rejected", problem))
            else:
                ok.append(r)
        return ok, bad

    def _accept_generator(self, r: Reply) -> str:
        records = r.msg.content.array_records
        if "model" not in records:
            return "reply has no 'model' ArrayRecord"
        state = read_tensors(records["model"])
        problem = state_problem(state, self.generator_state)
        r.metrics["state"] = state
        return problem

    def _accept_latents(self) -> Callable[[Reply], str]:
        generator, digest = self.generator, generator_digest(self.generator_state)

        def check(r: Reply) -> str:
            records = r.msg.content.array_records
            if "latents" not in records:
                if int(r.metrics.get("rows", -1)) == 0:  # no class with enough samples on this client
                    r.metrics["synthetic"] = None
                    self.round_empty += 1
                    return ""
                return "reply has no 'latents' ArrayRecord"
            try:
                syn = decode_latent_payload(
                    read_tensors(records["latents"]),
                    read_json(r.msg, "meta", "json"),
                    generator,
                    self.bundle.info,
                    max_size=self.max_client_images(),
                    digest=digest,
                )
            except (ValueError, KeyError) as err:  # SyntheticSetError is a ValueError
                return str(err)
            r.metrics["synthetic"] = syn
            r.metrics["latent_bytes"] = records["latents"].count_bytes()
            r.metrics["pixel_bytes"] = tensor_record({"images": syn.images, "labels": syn.labels}).count_bytes()
            return ""

        return check

    def update(self, round_: int, accepted: list[Reply]) -> dict[str, Any]:
        """FedAvg of the generator (phase 1), or train the global model on the decoded union (phase 2)."""
        if self.generator_phase(round_):
            weights = [float(r.metrics.get("examples", 1)) for r in accepted]
            self.generator_state = weighted_average([r.metrics["state"] for r in accepted], weights)
            client_mse = sum(w * float(r.metrics.get("recon_mse", 0.0)) for w, r in zip(weights, accepted, strict=True))
            return {
                "phase": "generator",
                "examples": int(sum(weights)),
                "client_recon_mse": round(client_mse / sum(weights), 6),
                "generator_test_mse": round(reconstruction_error(self.generator, self.bundle.test), 6),
            }
        rec = self.train_global(round_, self.merge(round_, accepted))
        sent = [r for r in accepted if r.metrics.get("synthetic") is not None]
        self.payload = {
            "latent": sum(int(r.metrics["latent_bytes"]) for r in sent),
            "pixel": sum(int(r.metrics["pixel_bytes"]) for r in sent),
            "clients": len(sent),
        }
        return {"phase": "distill", **rec, "latent_bytes": self.payload["latent"], "pixel_bytes": self.payload["pixel"]}

    def finish(self) -> dict[str, Any]:
        """Save the generator (reusable as ``generator_path``); report the uplink saving over pixels."""
        digest = generator_digest(self.generator_state)
        path = atomic_save_tensors(
            self.run.path / "generator.safetensors",
            self.generator_state,
            metadata={"digest": digest, **{k: str(v) for k, v in self.arch.items()}},
        )
        extra = super().finish()
        up2 = int(self.history[-1]["bytes_up"])
        latent, pixel, n = self.payload["latent"], self.payload["pixel"], max(1, self.payload["clients"])
        uplink = {
            "phase1_bytes": sum(int(h["bytes_up"]) for h in self.history[:-1]),
            "phase2_bytes": up2,
            "phase2_latent_payload_bytes": latent,
            "phase2_pixel_payload_bytes": pixel,
            "phase2_pixel_equivalent_bytes": up2 - latent + pixel,
            "per_client_latent_payload_bytes": round(latent / n, 1),
            "per_client_pixel_payload_bytes": round(pixel / n, 1),
            "payload_saving_ratio": round(pixel / latent, 3) if latent else None,
            "phase2_saving_ratio": round((up2 - latent + pixel) / up2, 3) if up2 else None,
        }
        self.run.log("uplink", **uplink)
        return {**extra, "generator_path": str(path.resolve()), "generator_digest": digest, "uplink": uplink}
