"""The exported model: what training leaves for inference, and nothing else.

``<storage>/<name>/model/`` holds

    model.pt      the network's state_dict, loadable with ``torch.load(..., weights_only=True)``
    config.json   ModelSpec: network name (arch) and config, classes, palette, void index, input size,
                  normalisation, and the logit bias that prediction adds (train --logit-adjust; null: none)

so inference rebuilds the model from the folder alone, without unpickling arbitrary objects.

Formats: "segray-model/2" (written) has ``arch``, the registry name of the network
(``segray.model.NETWORKS``); "segray-model/1" (still read) has none and always meant "unet".
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from segray import storage
from segray.errors import SegrayError
from segray.classes import CAMVID, ClassTable
from segray.model import DEFAULT_ARCH, NetworkConfig, build_model, network_config, network_names

MODEL_DIR = "model"
WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "config.json"
FORMAT = "segray-model/2"
FORMAT_V1 = "segray-model/1"  # before the network registry: no "arch" ...
FORMAT_V1_ARCH = "unet"  # ... and always this network

# ImageNet statistics: a standard, documented choice that keeps inputs near zero mean.
DEFAULT_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
DEFAULT_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class ModelError(SegrayError, ValueError):
    """A model folder that cannot be used; the message names the URI and the fix."""


@dataclass(frozen=True)
class ModelSpec:
    model: dict  # the network's config, to_dict(); see segray.model.network_config
    input_height: int
    input_width: int
    # The class table (classes.ClassTable.to_fields, without void_name): the training data's.
    classes: list[str] = field(default_factory=lambda: list(CAMVID.names))
    palette: list[list[int]] = field(default_factory=lambda: CAMVID.palette)
    void_index: int = CAMVID.void_index
    mean: tuple[float, float, float] = DEFAULT_MEAN  # applied to pixels scaled to [0, 1]
    std: tuple[float, float, float] = DEFAULT_STD
    format: str = FORMAT
    arch: str = DEFAULT_ARCH  # registry name of the network, segray.model.NETWORKS
    # (C,) added to the network's logits by load_model's model: train --logit-adjust (recipe.logit_bias).
    logit_bias: list[float] | None = None

    @property
    def network(self) -> NetworkConfig:
        """The network's config (raises segray.model.ModelConfigError if it does not parse)."""
        return network_config(self.arch, self.model)

    @property
    def num_classes(self) -> int:
        return self.network.num_classes

    @property
    def input_size(self) -> tuple[int, int]:
        return self.input_height, self.input_width

    @property
    def class_table(self) -> ClassTable:
        return ClassTable.from_fields(self.classes, self.palette, self.void_index)


def images_to_tensor(
    images: np.ndarray | torch.Tensor,
    mean: tuple[float, float, float] = DEFAULT_MEAN,
    std: tuple[float, float, float] = DEFAULT_STD,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """``(N, H, W, 3) uint8`` -> normalised ``(N, 3, H, W) float32`` on ``device``.

    The uint8 batch is moved first and converted on the device: 4x fewer bytes to copy."""
    x = torch.as_tensor(images).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def model_dir(uri: str) -> str:
    """A run folder or its ``model/`` folder -> the ``model/`` folder."""
    if storage.exists(storage.join(uri, CONFIG_FILE)):
        return uri
    return storage.join(uri, MODEL_DIR)


def save_model(dest: str, state_dict: dict, spec: ModelSpec) -> None:
    """Write ``model.pt`` then ``config.json`` (last: a folder without it is not a model)."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
    storage.write_bytes(storage.join(dest, WEIGHTS_FILE), buf.getvalue())
    storage.write_bytes(storage.join(dest, CONFIG_FILE), (json.dumps(asdict(spec), indent=2) + "\n").encode())


def load_spec(uri: str) -> ModelSpec:
    folder = model_dir(uri)
    config_uri = storage.join(folder, CONFIG_FILE)
    if not storage.exists(config_uri):
        raise ModelError(
            f"{uri}: no exported model ({MODEL_DIR}/{CONFIG_FILE} not found); pass a finished training run "
            f"(<storage>/<name>) or its {MODEL_DIR}/ folder"
        )
    try:
        raw = json.loads(storage.read_bytes(config_uri))
    except json.JSONDecodeError as e:
        raise ModelError(f"{config_uri}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") not in (FORMAT, FORMAT_V1):
        found = raw.get("format") if isinstance(raw, dict) else None
        raise ModelError(f"{config_uri}: format {found!r}, expected {FORMAT!r}")
    if raw["format"] == FORMAT_V1:
        # Version 1 had no arch (an "arch" key would have been ignored) and always meant FORMAT_V1_ARCH.
        # The spec read is complete in today's terms, so it carries today's format.
        raw = {**raw, "arch": FORMAT_V1_ARCH, "format": FORMAT}
    arch = raw.get("arch", DEFAULT_ARCH)
    if not isinstance(arch, str) or arch not in network_names():
        raise ModelError(f"{config_uri}: unknown network {arch!r}; known networks: {', '.join(network_names())} "
                         "(a model exported by another segray version?)")
    known = set(ModelSpec.__dataclass_fields__)
    raw = {k: v for k, v in raw.items() if k in known}
    try:
        raw["mean"], raw["std"] = tuple(raw.get("mean", DEFAULT_MEAN)), tuple(raw.get("std", DEFAULT_STD))
        spec = ModelSpec(**raw)
        num_classes = spec.num_classes  # the network config must parse too
        if spec.input_height < 1 or spec.input_width < 1:
            raise ValueError(f"input size {spec.input_height}x{spec.input_width}")
        classes = len(spec.classes)
        spec.class_table  # noqa: B018 - names, palette and void must make a usable table
    except (TypeError, ValueError, KeyError) as e:
        raise ModelError(f"{config_uri}: not a segray model config ({' '.join(str(e).split())[:200]}); "
                         "export the model again") from None
    if classes != num_classes:
        raise ModelError(f"{config_uri}: {classes} classes listed but the network has num_classes={num_classes}; "
                         "export the model again")
    bias = spec.logit_bias
    if bias is not None and not (isinstance(bias, list) and len(bias) == classes and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and np.isfinite(b) for b in bias)):
        raise ModelError(f"{config_uri}: logit_bias must be null or {classes} finite numbers, one per class, got "
                         f"{str(bias)[:200]}; export the model again")
    return spec


class LogitBias(torch.nn.Module):
    """An exported network plus its config's ``logit_bias`` (C,): what load_model returns for a
    model trained with --logit-adjust. The sum is float32 (a bf16 autocast's logits promote)."""

    def __init__(self, net: torch.nn.Module, bias: list[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("bias", torch.tensor(bias, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.bias


def load_tensors(data: bytes, name: str):
    """``torch.load(weights_only=True)`` of a file's bytes: tensors and plain containers only, so a
    model or checkpoint file can never run code on load; anything else is refused, naming the file."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        raise ModelError(
            f"{name}: refused to load: not a plain tensor file (torch.load weights_only=True: "
            f"{reason[-1] if reason else type(e).__name__})"
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, not a torch file: name it
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ModelError(
            f"{name}: not a readable torch file ({reason[:200]}); export the model again (jobs/train.py "
            "reruns export only when the run is complete)"
        ) from None


def fingerprint(uri: str) -> str:
    """sha256 of the exported model's ``config.json`` and ``model.pt`` bytes: what an output made
    with the model records, so that a rerun with another model is recognised whatever its URI."""
    folder = model_dir(uri)
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        data = storage.read_bytes(storage.join(folder, name))
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def load_model(uri: str, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild the exported model from ``uri`` (run folder or ``model/``), in eval mode on ``device``;
    with a ``logit_bias`` in its config, wrapped in :class:`LogitBias`."""
    spec = load_spec(uri)
    weights_uri = storage.join(model_dir(uri), WEIGHTS_FILE)
    state = load_tensors(storage.read_bytes(weights_uri), weights_uri)
    try:
        model = build_model(spec.network)
    except Exception as e:  # noqa: BLE001 - a config.json whose network cannot be built
        raise ModelError(f"{storage.join(model_dir(uri), CONFIG_FILE)}: cannot build its network {spec.arch} {spec.model} "
                         f"({' '.join(str(e).split())[:200]})") from None
    if not isinstance(state, dict):
        raise ModelError(f"{weights_uri}: holds a {type(state).__name__}, not a state_dict of tensors")
    try:
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - missing/unexpected keys, wrong shapes
        reason = " ".join(str(e).split())
        raise ModelError(
            f"{weights_uri}: the weights do not fit the network of {CONFIG_FILE} {spec.arch} {spec.model} ({reason[:300]}); "
            "the two files must come from the same export"
        ) from None
    if spec.logit_bias is not None:
        model = LogitBias(model, spec.logit_bias)
    return model.to(device).eval(), spec
