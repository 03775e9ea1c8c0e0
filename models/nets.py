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
    """Mini-VGG classifier of (B, in_channels, 32, 32) patches (3 per view) into ``n_classes`` logits."""

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

    def widen_input(self, in_channels: int) -> None:
        """Transfer to more input channels (further patch views): the first convolution keeps its weights for
        the first channels and starts at zero for the new ones, so the widened network begins as the trained
        one and learns what the new views add."""
        old = self.features[0][0]
        if in_channels < old.in_channels:
            raise ValueError(f"cannot narrow the input from {old.in_channels} to {in_channels} channels")
        new = nn.Conv2d(in_channels, old.out_channels, 3, padding=1, bias=False)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, : old.in_channels] = old.weight
        self.features[0][0] = new
        self.config = NetConfig(**{**asdict(self.config), "in_channels": in_channels})

    def n_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
