"""The U-Net of Ronneberger et al. (2015) and its config; nothing else lives here.

The config is a small frozen dataclass that travels inside every checkpoint and the exported
model, so inference rebuilds the exact network from the artifact alone (`UNetConfig.from_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from segray.camvid import NUM_CLASSES


@dataclass(frozen=True)
class UNetConfig:
    """Shape of the network: input channels, output classes, width and depth.

    Level i of the encoder has `base_channels * 2**i` channels, i = 0..depth; the input is
    padded to a multiple of `2**depth` pixels because every level halves the resolution.
    """

    in_channels: int = 3
    num_classes: int = NUM_CLASSES
    base_channels: int = 64
    depth: int = 4

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            # bool is an int subclass; True as a channel count is always a mistake.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UNetConfig.{field.name} must be a positive int, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        """Plain dict of the fields, for JSON metadata and checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        """Inverse of `to_dict`; missing keys take their defaults.

        Unknown keys raise instead of being dropped: a key we do not understand means the
        artifact was written by another version, and silently building a different network
        would only fail later, at `load_state_dict`, with a less clear message.
        """
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown UNetConfig keys {unknown}; valid keys are {sorted(known)}"
            )
        return cls(**dict(d))


class DoubleConv(nn.Sequential):
    """(conv 3x3 -> BN -> ReLU) x 2; keeps H, W (padding 1, unlike the paper's valid convs)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        # bias=False: the BatchNorm right after has its own shift, a conv bias would be redundant.
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """Max-pool 2x2 (halves H, W) then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(kernel_size=2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """Transposed conv 2x2 stride 2 (doubles H, W, halves channels), concat skip, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        # After concatenation: in_channels // 2 upsampled + out_channels from the skip.
        self.conv = DoubleConv(in_channels // 2 + out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # Shapes always match: UNet.forward pads the input to a multiple of 2**depth.
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net: (N, in_channels, H, W) float image -> (N, num_classes, H, W) float logits.

    Any H, W >= 1 is accepted: the input is zero-padded at the bottom and right up to a
    multiple of 2**depth and the logits are cropped back to (H, W).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.base_channels * 2**i for i in range(config.depth + 1)]
        self.inc = DoubleConv(config.in_channels, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(config.depth))
        self.ups = nn.ModuleList(
            Up(widths[i + 1], widths[i]) for i in reversed(range(config.depth))
        )
        self.head = nn.Conv2d(widths[0], config.num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"UNet expects (N, {self.config.in_channels}, H, W) input, got {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        multiple = 2**self.config.depth
        pad_h = -height % multiple
        pad_w = -width % multiple
        if pad_h or pad_w:
            # Zero padding rather than reflect: reflect needs pad < size and so fails on small
            # inputs (e.g. 1x1 -> 16x16), while zeros work for any size, match what every 3x3
            # conv already sees at the border, and equal the mean colour of a normalised image.
            # Bottom/right only, so the crop below is a plain slice from the origin.
            x = F.pad(x, (0, pad_w, 0, pad_h))

        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)[..., :height, :width]


def build_model(config: UNetConfig) -> UNet:
    """The one place a network is made from a config (training, export and inference)."""
    return UNet(config)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
