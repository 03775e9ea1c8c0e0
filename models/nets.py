"""The networks: seed 002's mini-VGG for 32×32 2.5D patches, and seed 003's residual encoder–decoder.

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


# -- seed 003: the residual network of the harmonization stage ------------------------------------------------
@dataclass
class ResidualNetConfig:
    """Constructor arguments of :class:`ResidualUNet` (stored in every checkpoint)."""

    in_channels: int = 3  # a thin slab: the slice and its two neighbours
    width: int = 12
    out_channels: int = 2  # the blur residual map, the noise residual map
    descriptors: int = 3  # the series' noise descriptors (``models.residual.descriptors``): how much, how sharp
    maps: tuple[str, ...] = ("blur", "noise")  # what each output channel is (a noise-only network: ("noise",))
    # what the slab is: "input" (the histogram stage's output) or "denoised" (the input plus the noise map of
    # the modality's noise network: a blur network that converts the kernel of an image without its noise)
    reads: str = "input"

    def __post_init__(self) -> None:
        self.maps = tuple(self.maps)  # a checkpoint stores a list
        if len(self.maps) != self.out_channels or not set(self.maps) <= {"blur", "noise"}:
            raise ValueError(f"maps {self.maps} do not name the {self.out_channels} output channels (blur, noise)")
        if self.reads not in ("input", "denoised"):
            raise ValueError(f"a residual network reads 'input' or 'denoised', not {self.reads!r}")


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU(inplace=True))


class ResidualUNet(nn.Module):
    """The seed's FIG. 3: convolutions down, deconvolutions up, skip connections summed element-wise.

    Input (B, slab, H, W) with H and W multiples of 4, in normalised units; output (B, 2, H, W): channel 0
    the blur residual map, channel 1 the noise residual map of the slab's centre slice, each the correction
    that, added to the input, removes that component (seed 003: the estimated patch is input + residual).
    Most convolutions run at half and quarter resolution, so a 512² slice costs about 2 GMAC.

    A kernel's blur cannot be told from one patch alone (an edge-enhancing kernel and a sharp edge look
    alike), so the network is also given the series' noise descriptors — the level and the correlation of
    its noise, which the kernel and the dose set — as biases at full and quarter resolution (as FFDNet is
    given its noise level).
    """

    def __init__(self, config: ResidualNetConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.head = _conv(config.in_channels, w)
        self.down1 = nn.Sequential(_conv(w, 2 * w, stride=2), _conv(2 * w, 2 * w))
        self.down2 = nn.Sequential(_conv(2 * w, 4 * w, stride=2), _conv(4 * w, 4 * w), _conv(4 * w, 4 * w))
        self.up1 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec1 = _conv(2 * w, 2 * w)
        self.up0 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec0 = _conv(w, w)
        self.out = nn.Conv2d(w, config.out_channels, 3, padding=1)
        k = config.descriptors
        self.to_full = nn.Linear(k, w) if k else None
        self.to_deep = nn.Sequential(nn.Linear(k, 4 * w), nn.ReLU(inplace=True), nn.Linear(4 * w, 4 * w)) if k else None

    def forward(self, x: torch.Tensor, descriptors: torch.Tensor | None = None) -> torch.Tensor:
        """Residual maps (B, out_channels, H, W) of slabs ``x`` with their series' ``descriptors`` (B, k)."""
        s0 = self.head(x)
        if self.to_full is not None:
            if descriptors is None:
                raise ValueError("this residual network reads the series' noise descriptors")
            s0 = s0 + self.to_full(descriptors)[:, :, None, None]
        s1 = self.down1(s0)
        deep = self.down2(s1)
        if self.to_deep is not None:
            deep = deep + self.to_deep(descriptors)[:, :, None, None]
        d1 = self.dec1(self.up1(deep) + s1)
        d0 = self.dec0(self.up0(d1) + s0)
        return self.out(d0)

    def n_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
