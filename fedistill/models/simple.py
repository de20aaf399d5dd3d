"""Small cross-architecture evaluators: MLP and LeNet."""

from __future__ import annotations

import torch
from torch import nn

from fedistill.models.registry import register_model

__all__ = ["MLP", "LeNet"]


@register_model("mlp")
class MLP(nn.Module):
    """Two hidden ReLU layers on the flattened image.

    Parameters
    ----------
    width
        Hidden units per layer.
    """

    def __init__(self, *, channels: int, num_classes: int, image_size: tuple[int, int], width: int = 128) -> None:
        super().__init__()
        d = channels * image_size[0] * image_size[1]
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.feature_dim = width
        self.classifier = nn.Linear(width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Last hidden layer, ``[N, width]``."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


@register_model("lenet")
class LeNet(nn.Module):
    """LeNet-5 style: two conv5x5 + max-pool stages, then 120-84 fully connected.

    Both convolutions are padded ("same"), so any input of at least 4x4 works.

    Parameters
    ----------
    width
        Channels of the second conv layer (16 in LeNet-5); the first has ``width * 3 // 8``.
    """

    def __init__(self, *, channels: int, num_classes: int, image_size: tuple[int, int], width: int = 16) -> None:
        super().__init__()
        c1 = max(1, width * 3 // 8)
        self.features = nn.Sequential(
            nn.Conv2d(channels, c1, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, width, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(width * (image_size[0] // 4) * (image_size[1] // 4), 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
        )
        self.feature_dim = 84
        self.classifier = nn.Linear(84, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the 84-unit layer."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
