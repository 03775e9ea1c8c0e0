"""The seed-002 network: a mini-VGG for 32×32 2.5D patches (3 orthogonal planes as channels).

Three VGG blocks (two 3×3 convolutions + batch norm + ReLU, then 2×2 max-pool) take 32×32 to 4×4; a small
fully connected head classifies. The same trunk serves landmark classification (pretraining, many classes) and
lesion vs normal (transfer: the trunk is kept, the head replaced). The checkpoint stores the constructor
arguments, so ``MiniVGG(**ckpt["config"])`` rebuilds it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class NetConfig:
    """Constructor arguments of :class:`MiniVGG` (stored in every checkpoint)."""

    n_classes: int = 2
    width: int = 16
    hidden: int = 128
    dropout: float = 0.3
    in_channels: int = 3
    patch_size: int = 32


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class MiniVGG(nn.Module):
    """Mini-VGG classifier of (B, 3, 32, 32) patches into ``n_classes`` logits."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.features = nn.Sequential(_block(config.in_channels, w), _block(w, 2 * w), _block(2 * w, 4 * w))
        side = config.patch_size // 8
        self.embed = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * w * side * side, config.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout),
        )
        self.head = nn.Linear(config.hidden, config.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes)."""
        return self.head(self.embed(self.features(x)))

    def replace_head(self, n_classes: int) -> None:
        """Transfer: keep the trunk and embedding, start a fresh classifier for a new task."""
        self.config = NetConfig(**{**asdict(self.config), "n_classes": n_classes})
        self.head = nn.Linear(self.config.hidden, n_classes)

    def n_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
