"""ResNet-18 with BatchNorm, CIFAR-style stem (conv3x3, no max-pool), for cross-architecture evaluation."""

from __future__ import annotations

import torch
from torch import nn

from fedistill.models.registry import register_model

__all__ = ["ResNet18"]


class BasicBlock(nn.Module):
    """Two conv3x3-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@register_model("resnet18")
class ResNet18(nn.Module):
    """ResNet-18 (BatchNorm).

    Parameters
    ----------
    width
        Channels of the first stage (64 in the original); stages use 1x, 2x, 4x, 8x.
    """

    def __init__(self, *, channels: int, num_classes: int, image_size: tuple[int, int], width: int = 64) -> None:
        super().__init__()
        del image_size  # global average pooling makes the head size-independent
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks: list[nn.Module] = []
        in_ch = width
        for i, mult in enumerate((1, 2, 4, 8)):
            out_ch = width * mult
            blocks += [BasicBlock(in_ch, out_ch, 1 if i == 0 else 2), BasicBlock(out_ch, out_ch, 1)]
            in_ch = out_ch
        self.layers = nn.Sequential(*blocks)
        self.feature_dim = in_ch
        self.classifier = nn.Linear(in_ch, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features of the last stage."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
