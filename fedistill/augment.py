"""Differentiable siamese augmentation (DSA, Zhao & Bilen 2021).

One augmentation family is chosen per call (``color``, ``crop``, ``cutout``,
``flip``, ``scale``, ``rotate``) and its random parameters are drawn per *group*:
every row of a batch belongs to a group, and rows of the same group get the same
transformation. Matching engines give the real and the synthetic batch of a class
the same group (and pass the same :class:`DSAParams`), which is the "siamese" part;
evaluation uses one group per image. Every op is differentiable in the images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["DSA", "DSAConfig", "DSAParams"]


@dataclass(frozen=True)
class DSAConfig:
    """DSA magnitudes (the reference defaults).

    Attributes
    ----------
    ops
        Families to choose from, one per call.
    flip
        Allow horizontal flips (turned off for digit datasets).
    """

    scale: float = 1.2
    rotate: float = 15.0
    crop: float = 0.125
    cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    ops: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")
    flip: bool = True


@dataclass
class DSAParams:
    """Random parameters of one DSA call: the chosen op and per-group tensors."""

    op: str
    values: dict[str, torch.Tensor]
    num_groups: int


class DSA:
    """Differentiable siamese augmentation.

    Parameters
    ----------
    config
        Magnitudes and op list.
    """

    def __init__(self, config: DSAConfig | None = None) -> None:
        self.config = config or DSAConfig()
        self.ops = tuple(op for op in self.config.ops if op != "flip" or self.config.flip)
        unknown = set(self.ops) - set(_SAMPLERS)
        if unknown:
            raise ValueError(f"unknown DSA ops {sorted(unknown)}; valid: {sorted(_SAMPLERS)}")

    def sample(
        self,
        num_groups: int,
        generator: torch.Generator,
        *,
        image_size: tuple[int, int],
        op: str | None = None,
        op_per_group: bool = False,
    ) -> DSAParams:
        """Draw the op (unless given) and its parameters for ``num_groups`` groups.

        With ``op_per_group`` every group draws its own op (as the reference DM code
        does per class); otherwise one op serves the whole call.
        """
        if op is None and op_per_group:
            values = {
                "op_index": torch.randint(len(self.ops), (num_groups,), generator=generator, device=generator.device)
            }
            for name in self.ops:
                for key, v in _SAMPLERS[name](self.config, num_groups, generator, image_size).items():
                    values[f"{name}.{key}"] = v
            return DSAParams("mixed", values, num_groups)
        if op is None:
            op = self.ops[int(torch.randint(len(self.ops), (1,), generator=generator))]
        values = _SAMPLERS[op](self.config, num_groups, generator, image_size)
        return DSAParams(op, values, num_groups)

    def apply(self, x: torch.Tensor, params: DSAParams, groups: torch.Tensor | None = None) -> torch.Tensor:
        """Apply ``params`` to ``x``; row ``i`` uses group ``groups[i]`` (default: group ``i``)."""
        if groups is None:
            if x.shape[0] != params.num_groups:
                raise ValueError(f"{x.shape[0]} rows but parameters for {params.num_groups} groups; pass groups=")
            vals = {k: v.to(x.device) for k, v in params.values.items()}
        else:
            g = groups.to(params.values[next(iter(params.values))].device)
            vals = {k: v[g].to(x.device) for k, v in params.values.items()}
        if params.op == "mixed":
            return self._apply_mixed(x, vals)
        return _APPLIERS[params.op](x, vals)

    def _apply_mixed(self, x: torch.Tensor, vals: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every row gets the op its group drew (``op_index``), with that op's parameters."""
        out = torch.empty_like(x)
        for k, name in enumerate(self.ops):
            rows = torch.nonzero(vals["op_index"] == k).flatten()
            if len(rows):
                sub = {key.split(".", 1)[1]: v[rows] for key, v in vals.items() if key.startswith(f"{name}.")}
                out[rows] = _APPLIERS[name](x[rows], sub)
        return out

    def __call__(self, x: torch.Tensor, generator: torch.Generator, groups: torch.Tensor | None = None) -> torch.Tensor:
        """Sample and apply in one step (one group per row unless ``groups`` is given)."""
        n = x.shape[0] if groups is None else int(groups.max()) + 1
        return self.apply(x, self.sample(n, generator, image_size=tuple(x.shape[-2:])), groups)


# ---------------------------------------------------------------- parameter sampling
def _u(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device)


def _sample_scale(c: DSAConfig, n: int, g: torch.Generator, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    lo = 1.0 / c.scale
    return {"sx": _u(n, g) * (c.scale - lo) + lo, "sy": _u(n, g) * (c.scale - lo) + lo}


def _sample_rotate(c: DSAConfig, n: int, g: torch.Generator, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    return {"angle": (_u(n, g) - 0.5) * 2 * c.rotate / 180 * math.pi}


def _sample_flip(c: DSAConfig, n: int, g: torch.Generator, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    return {"flip": _u(n, g) < 0.5}


def _sample_color(c: DSAConfig, n: int, g: torch.Generator, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    return {
        "brightness": (_u(n, g) - 0.5) * c.brightness,
        "saturation": _u(n, g) * c.saturation,
        "contrast": _u(n, g) + c.contrast,
    }


def _sample_crop(c: DSAConfig, n: int, g: torch.Generator, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    sh, sw = int(hw[0] * c.crop + 0.5), int(hw[1] * c.crop + 0.5)
    return {
        "dy": torch.randint(-sh, sh + 1, (n,), generator=g, device=g.device),
        "dx": torch.randint(-sw, sw + 1, (n,), generator=g, device=g.device),
    }


def _sample_cutout(c: DSAConfig, n: int, g: torch.Generator, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    ch, cw = int(hw[0] * c.cutout + 0.5), int(hw[1] * c.cutout + 0.5)
    return {
        "cy": torch.randint(0, hw[0] + (1 - ch % 2), (n,), generator=g, device=g.device),
        "cx": torch.randint(0, hw[1] + (1 - cw % 2), (n,), generator=g, device=g.device),
        "size": torch.tensor([ch, cw], device=g.device).expand(n, 2),
    }


_SAMPLERS = {
    "scale": _sample_scale,
    "rotate": _sample_rotate,
    "flip": _sample_flip,
    "color": _sample_color,
    "crop": _sample_crop,
    "cutout": _sample_cutout,
}


# ----------------------------------------------------------------------- application
def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _apply_scale(x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
    z = torch.zeros_like(v["sx"])
    theta = torch.stack([torch.stack([v["sx"], z, z], 1), torch.stack([z, v["sy"], z], 1)], 1)
    return _affine(x, theta)


def _apply_rotate(x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
    a = v["angle"]
    cos, sin, z = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, sin, z], 1), torch.stack([-sin, cos, z], 1)], 1)
    return _affine(x, theta)


def _apply_flip(x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.where(v["flip"].view(-1, 1, 1, 1), x.flip(3), x)


def _apply_color(x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
    x = x + v["brightness"].view(-1, 1, 1, 1).to(x.dtype)
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * v["saturation"].view(-1, 1, 1, 1).to(x.dtype) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * v["contrast"].view(-1, 1, 1, 1).to(x.dtype) + m


def _apply_crop(x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
    """Integer translation with zero fill (gradients flow through the gather)."""
    n, _, h, w = x.shape
    ys = torch.arange(h, device=x.device).view(1, h, 1) + v["dy"].view(-1, 1, 1) + 1
    xs = torch.arange(w, device=x.device).view(1, 1, w) + v["dx"].view(-1, 1, 1) + 1
    ys, xs = ys.clamp(0, h + 1).expand(n, h, w), xs.clamp(0, w + 1).expand(n, h, w)
    padded = F.pad(x, [1, 1, 1, 1])
    b = torch.arange(n, device=x.device).view(-1, 1, 1).expand(n, h, w)
    return padded.permute(0, 2, 3, 1)[b, ys, xs].permute(0, 3, 1, 2)


def _apply_cutout(x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
    _, _, h, w = x.shape
    size = v["size"]
    top = (v["cy"] - size[:, 0] // 2).view(-1, 1, 1)
    left = (v["cx"] - size[:, 1] // 2).view(-1, 1, 1)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (
        (ys >= top) & (ys < top + size[:, 0].view(-1, 1, 1)) & (xs >= left) & (xs < left + size[:, 1].view(-1, 1, 1))
    )
    return x * (~inside).unsqueeze(1).to(x.dtype)


_APPLIERS = {
    "scale": _apply_scale,
    "rotate": _apply_rotate,
    "flip": _apply_flip,
    "color": _apply_color,
    "crop": _apply_crop,
    "cutout": _apply_cutout,
}
