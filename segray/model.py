"""The segmentation networks, their configs, and the registry that names them.

A network is known by a short name, its *arch* ("unet", "fcn"). Its config is a small frozen
dataclass that travels (as ``to_dict()``, next to the arch) inside every checkpoint and the
exported model, so inference rebuilds the exact network from the artifact alone:
``build_network(arch, args)``, or ``build_model(config)`` for a config instance.

Every config has at least ``in_channels`` and ``num_classes``; every network maps a float image
``(N, in_channels, H, W)`` to float logits ``(N, num_classes, H, W)`` for any H, W >= 1.

Adding a network takes three things, all in this file and nothing elsewhere:

1. a config dataclass: ``@dataclass(frozen=True)``, subclass of ``NetworkConfig``, with the
   fields ``in_channels`` and ``num_classes`` plus its own (int fields are checked to be
   positive ints; check other fields in ``__post_init__``, calling ``super().__post_init__()``);
2. the ``nn.Module`` class, whose ``__init__`` takes that config (and keeps it as ``.config``);
3. one ``Network(...)`` entry in ``NETWORKS`` below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from segray.errors import SegrayError

DEFAULT_ARCH = "unet"


class ModelConfigError(SegrayError, ValueError):
    """An unknown network name or bad network arguments; the message names the network."""


def _arch_label(config_type: type) -> str:
    """``network 'unet'`` for a registered config type, its class name otherwise (for messages)."""
    for entry in NETWORKS.values():
        if entry.config_type is config_type:
            return f"network {entry.name!r}"
    return config_type.__name__


@dataclass(frozen=True)
class NetworkConfig:
    """Base of the config dataclasses: checks, ``to_dict`` and ``from_dict``."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if field.type not in (int, "int") or field.metadata.get("own_check"):
                continue
            value = getattr(self, field.name)
            # bool is an int subclass; True as a channel count is always a mistake.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelConfigError(
                    f"{_arch_label(type(self))}: {field.name} must be a positive int, got {value!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields, for JSON metadata and checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Inverse of `to_dict`; missing keys take their defaults.

        Unknown keys raise instead of being dropped: a key we do not understand means the
        artifact was written by another version, and silently building a different network
        would only fail later, at `load_state_dict`, with a less clear message.
        """
        label = _arch_label(cls)
        if not isinstance(d, Mapping):
            raise ModelConfigError(f"{label}: arguments must be a mapping, got {type(d).__name__}")
        fields = dataclasses.fields(cls)
        known = sorted(field.name for field in fields)
        unknown = sorted(map(str, set(d) - set(known)))
        if unknown:
            raise ModelConfigError(f"{label}: unknown arguments {unknown}; valid arguments are {known}")
        missing = sorted(
            field.name
            for field in fields
            if field.name not in d
            and field.default is dataclasses.MISSING
            and field.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ModelConfigError(f"{label}: missing arguments {missing}")
        return cls(**dict(d))


@dataclass(frozen=True)
class UNetConfig(NetworkConfig):
    """Shape of the U-Net: input channels, output classes, width and depth.

    Level i of the encoder has `base_channels * 2**i` channels, i = 0..depth; the input is
    padded to a multiple of `2**depth` pixels because every level halves the resolution.
    `dropout` is the probability of channel dropout (``nn.Dropout2d``) at the end of the
    contracting path, where Ronneberger et al. put theirs; 0 (the default) adds none. It has no
    weights, so it does not change the state dict, and acts in training mode only. `ibn` makes
    the first norm of the first `ibn` encoder levels an `IBN` layer (IBN-Net's instance norm on
    half the channels, for appearance that differs from the training frames'); 0, the default,
    keeps BatchNorm everywhere and the state dict of models exported before it. `ppm` 1 puts a
    `PyramidPooling` module (PSPNet's) on the coarsest level, so that every pixel's decoding sees
    the whole frame's layout; 0, the default, adds nothing.
    """

    in_channels: int = 3
    num_classes: int = 11  # CamVid's 11 classes: the default of models exported before the registry
    base_channels: int = 64
    depth: int = 4
    dropout: float = 0.0
    # Encoder levels (from the first) whose first norm is IBN (class IBN); 0: BatchNorm only.
    ibn: int = dataclasses.field(default=0, metadata={"own_check": True})
    ppm: int = dataclasses.field(default=0, metadata={"own_check": True})  # 1: PyramidPooling at the bottleneck

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ppm not in (0, 1) or isinstance(self.ppm, (bool, float)):
            raise ModelConfigError(f"{_arch_label(type(self))}: ppm must be 0 (off) or 1 (on), got {self.ppm!r}")
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ModelConfigError(f"{_arch_label(type(self))}: dropout must be a number in [0, 1), got {p!r}")
        if isinstance(self.ibn, bool) or not isinstance(self.ibn, int) or not 0 <= self.ibn <= self.depth + 1:
            raise ModelConfigError(f"{_arch_label(type(self))}: ibn must be an int from 0 to depth + 1 "
                                   f"({self.depth + 1}), the encoder's levels; got {self.ibn!r}")


@dataclass(frozen=True)
class FCNConfig(NetworkConfig):
    """Shape of the FCN: the U-Net's encoder (same widths and depth), no decoder."""

    in_channels: int = 3
    num_classes: int = 11
    base_channels: int = 64
    depth: int = 4


class IBN(nn.Module):
    """Instance norm (affine) on the first half of the channels, BatchNorm on the rest: the
    "IBN-a" layer of Pan et al. (2018, IBN-Net), which keeps a frame's contrast and colour cast
    out of the features of the first levels while the BatchNorm half keeps what tells classes
    apart; their networks carried it to domains they had not trained on."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.half = channels // 2
        self.inn = nn.InstanceNorm2d(self.half, affine=True)
        self.bn = nn.BatchNorm2d(channels - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        out = torch.cat([self.inn(a.contiguous()), self.bn(b)], dim=1)
        # Instance norm gives back NCHW: channels-last in, channels-last out for the next conv.
        return out.contiguous(memory_format=torch.channels_last) if _channels_last(x) else out


class PyramidPooling(nn.Module):
    """The pyramid pooling module of Zhao et al. (2017, PSPNet): the features averaged over
    1x1, 2x2, 3x3 and 6x6 grids of the frame, each reduced to a quarter of the channels by a
    1x1 conv (bias and ReLU: a 1x1 bin has too few values per batch for BatchNorm), upsampled
    bilinearly, concatenated with the input and fused back to its channel count (1x1 conv, BN,
    ReLU). Same shape in and out; any H, W >= 1."""

    BINS = (1, 2, 3, 6)

    def __init__(self, channels: int) -> None:
        super().__init__()
        reduced = max(1, channels // 4)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(channels, reduced, 1), nn.ReLU(inplace=True))
            for b in self.BINS
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(channels + reduced * len(self.BINS), channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False) for stage in self.stages]
        out = self.fuse(torch.cat([x, *pooled], dim=1))
        return out.contiguous(memory_format=torch.channels_last) if _channels_last(x) else out


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class DoubleConv(nn.Sequential):
    """(conv 3x3 -> BN -> ReLU) x 2; keeps H, W (padding 1, unlike the paper's valid convs).
    ``ibn``: the first norm is an `IBN` layer."""

    def __init__(self, in_channels: int, out_channels: int, ibn: bool = False) -> None:
        # bias=False: the BatchNorm right after has its own shift, a conv bias would be redundant.
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            IBN(out_channels) if ibn else nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """Max-pool 2x2 (halves H, W) then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, ibn: bool = False) -> None:
        super().__init__(nn.MaxPool2d(kernel_size=2), DoubleConv(in_channels, out_channels, ibn))


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


def _check_and_pad(net: nn.Module, x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    """Refuse input of the wrong rank or channel count; zero-pad H, W up to ``multiple``.

    Returns the padded input and the original H, W to crop the logits back to.

    Zero padding rather than reflect: reflect needs pad < size and so fails on small inputs
    (e.g. 1x1 -> 16x16), while zeros work for any size, match what every 3x3 conv already sees
    at the border, and equal the mean colour of a normalised image. Bottom/right only, so the
    caller's crop back to (H, W) is a plain slice from the origin.
    """
    in_channels = net.config.in_channels
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{type(net).__name__} expects (N, {in_channels}, H, W) input, got {tuple(x.shape)}")
    height, width = x.shape[-2:]
    pad_h = -height % multiple
    pad_w = -width % multiple
    return (F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x), height, width


class UNet(nn.Module):
    """U-Net of Ronneberger et al. (2015): (N, in_channels, H, W) -> (N, num_classes, H, W) logits.

    Any H, W >= 1 is accepted: the input is zero-padded at the bottom and right up to a
    multiple of 2**depth and the logits are cropped back to (H, W).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.base_channels * 2**i for i in range(config.depth + 1)]
        self.inc = DoubleConv(config.in_channels, widths[0], ibn=config.ibn > 0)
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1], ibn=config.ibn > i + 1) for i in range(config.depth))
        self.ups = nn.ModuleList(
            Up(widths[i + 1], widths[i]) for i in reversed(range(config.depth))
        )
        self.head = nn.Conv2d(widths[0], config.num_classes, kernel_size=1)
        self.drop = nn.Dropout2d(config.dropout) if config.dropout else nn.Identity()
        self.context = PyramidPooling(widths[-1]) if config.ppm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, height, width = _check_and_pad(self, x, 2**self.config.depth)
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = self.drop(self.context(skips.pop()))
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)[..., :height, :width]


class FCN(nn.Module):
    """Fully convolutional encoder, 1x1 classifier, bilinear upsampling; no skip connections.

    The encoder is the U-Net's (DoubleConv, then `depth` Down blocks); the logits of its coarsest
    level (1/2**depth of the input) are upsampled bilinearly to the padded size and cropped back
    to (H, W), so any H, W >= 1 is accepted, as for the U-Net.
    """

    def __init__(self, config: FCNConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.base_channels * 2**i for i in range(config.depth + 1)]
        self.inc = DoubleConv(config.in_channels, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(config.depth))
        self.head = nn.Conv2d(widths[-1], config.num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, height, width = _check_and_pad(self, x, 2**self.config.depth)
        padded = x.shape[-2:]
        x = self.inc(x)
        for down in self.downs:
            x = down(x)
        logits = F.interpolate(self.head(x), size=padded, mode="bilinear", align_corners=False)
        return logits[..., :height, :width]


@dataclass(frozen=True)
class Network:
    """A registry entry: the name, the config dataclass, what builds the module, one line for help."""

    name: str
    config_type: type[NetworkConfig]
    builder: Callable[[Any], nn.Module]
    description: str


NETWORKS: Mapping[str, Network] = MappingProxyType({
    entry.name: entry
    for entry in (
        Network("unet", UNetConfig, UNet, "U-Net (Ronneberger et al. 2015): encoder-decoder with skip connections"),
        Network("fcn", FCNConfig, FCN, "FCN: the U-Net's encoder, 1x1 classifier, bilinear upsampling, no skips"),
    )
})


def network_names() -> list[str]:
    """The registered network names, sorted."""
    return sorted(NETWORKS)


def _entry(arch: str) -> Network:
    if not isinstance(arch, str) or arch not in NETWORKS:
        raise ModelConfigError(f"unknown network {arch!r}; known networks: {', '.join(network_names())}")
    return NETWORKS[arch]


def network_config(arch: str, args: Mapping[str, Any]) -> NetworkConfig:
    """The config of network ``arch`` from its arguments (missing ones take their defaults).

    Raises ModelConfigError for an unknown name (listing the known ones), an unknown argument
    (listing the valid ones) or a bad value (naming the argument and the network)."""
    return _entry(arch).config_type.from_dict(args)


def arch_of(config: NetworkConfig) -> str:
    """The registry name of a config instance (``arch_of(UNetConfig()) == "unet"``)."""
    for entry in NETWORKS.values():
        if type(config) is entry.config_type:
            return entry.name
    raise ModelConfigError(
        f"{type(config).__name__} is not the config of a registered network; known networks: "
        f"{', '.join(network_names())}"
    )


def build_model(config: NetworkConfig) -> nn.Module:
    """The one place a network is made from a config (training, export and inference)."""
    return NETWORKS[arch_of(config)].builder(config)


def build_network(arch: str, args: Mapping[str, Any]) -> nn.Module:
    """``build_model(network_config(arch, args))``."""
    return build_model(network_config(arch, args))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
