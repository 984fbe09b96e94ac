"""Networks by name: the registry, every registered network's shapes, and the exported-model format
(segray-model/2 with ``arch``; segray-model/1, which has none, still loads as the U-Net)."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch
from torch import nn

from segray import modelio
from segray.model import (
    DEFAULT_ARCH,
    FCN,
    NETWORKS,
    FCNConfig,
    ModelConfigError,
    UNet,
    UNetConfig,
    arch_of,
    build_model,
    build_network,
    network_config,
    network_names,
)

ARCHS = sorted(NETWORKS)
TINY = {"base_channels": 4, "depth": 2}  # every test runs in milliseconds on a CPU
CLASSES = ["sky", "road", "car", "tree", "person"]
PALETTE = [[i * 40, 255 - i * 40, i * 10] for i in range(len(CLASSES))]
SIZE = (17, 23)


def _trained_bn(model: nn.Module, in_channels: int = 3) -> nn.Module:
    """A few train-mode passes so BatchNorm's running statistics are not the identity: a load that
    dropped buffers would then change the outputs."""
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, in_channels, 12, 20) * 3 + 1)
    return model.eval()


def _spec(config, arch: str, **kw) -> modelio.ModelSpec:
    return modelio.ModelSpec(model=config.to_dict(), input_height=SIZE[0], input_width=SIZE[1], classes=list(CLASSES),
                             palette=PALETTE, arch=arch, **kw)


# --- the registry ---------------------------------------------------------------------------------


def test_registry_lists_unet_and_fcn() -> None:
    assert network_names() == ["fcn", "unet"]
    assert DEFAULT_ARCH == "unet"
    assert NETWORKS["unet"].config_type is UNetConfig and NETWORKS["fcn"].config_type is FCNConfig
    for name, entry in NETWORKS.items():
        assert entry.name == name
        assert entry.description and "\n" not in entry.description
        fields = {f.name for f in dataclasses.fields(entry.config_type)}
        assert {"in_channels", "num_classes"} <= fields
    with pytest.raises(TypeError):
        NETWORKS["segnet"] = NETWORKS["unet"]  # read-only


def test_unknown_network_lists_known_ones() -> None:
    for call in (lambda: network_config("segnet", {}), lambda: build_network("segnet", TINY)):
        with pytest.raises(ModelConfigError, match=r"^unknown network 'segnet'; known networks: fcn, unet$"):
            call()
    with pytest.raises(ValueError, match="known networks: fcn, unet"):  # ModelConfigError is a ValueError
        network_config("UNet", {})


@pytest.mark.parametrize("arch", ARCHS)
def test_unknown_argument_names_it_the_network_and_the_valid_ones(arch: str) -> None:
    valid = r"'base_channels', 'depth', 'dropout', 'ibn', 'in_channels', 'num_classes', 'ppm'" if arch == "unet" else \
        r"'base_channels', 'depth', 'in_channels', 'num_classes'"
    with pytest.raises(ModelConfigError, match=rf"network '{arch}': unknown arguments \['bilinear'\]; valid arguments "
                                               rf"are \[{valid}\]"):
        network_config(arch, {**TINY, "bilinear": True})


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("key,value", [("depth", 0), ("num_classes", -1), ("base_channels", 4.0),
                                       ("in_channels", True), ("num_classes", "5")])
def test_invalid_argument_names_it_and_the_network(arch: str, key: str, value) -> None:
    message = rf"^network '{arch}': {key} must be a positive int, got {re.escape(repr(value))}$"
    with pytest.raises(ModelConfigError, match=message):
        build_network(arch, {**TINY, key: value})


def test_arguments_must_be_a_mapping() -> None:
    with pytest.raises(ModelConfigError, match=r"network 'fcn': arguments must be a mapping, got list"):
        network_config("fcn", [("depth", 2)])


@pytest.mark.parametrize("arch", ARCHS)
def test_config_round_trip_and_arch_of(arch: str) -> None:
    config = network_config(arch, {"in_channels": 1, "num_classes": 5, **TINY})
    assert type(config) is NETWORKS[arch].config_type
    assert (config.in_channels, config.num_classes, config.base_channels, config.depth) == (1, 5, 4, 2)
    assert arch_of(config) == arch
    assert network_config(arch, config.to_dict()) == config
    assert network_config(arch, {}) == NETWORKS[arch].config_type()  # missing arguments take defaults
    model = build_model(config)
    assert type(model) is {"unet": UNet, "fcn": FCN}[arch]
    assert model.config == config
    assert type(build_network(arch, config.to_dict())) is type(model)


def test_arch_of_refuses_a_foreign_config() -> None:
    @dataclasses.dataclass(frozen=True)
    class Other:
        in_channels: int = 3
        num_classes: int = 11

    with pytest.raises(ModelConfigError, match="Other is not the config of a registered network; known networks: fcn, unet"):
        arch_of(Other())
    with pytest.raises(ModelConfigError, match="known networks"):
        build_model(Other())


def test_unet_default_config_unchanged() -> None:
    # Models exported before the registry rely on these defaults.
    assert UNetConfig().to_dict() == {"in_channels": 3, "num_classes": 11, "base_channels": 64, "depth": 4,
                                     "dropout": 0.0, "ibn": 0, "ppm": 0}


def test_networks_differ() -> None:
    # The registry is more than two names for one network: the weights do not fit each other.
    unet, fcn = build_network("unet", TINY), build_network("fcn", TINY)
    assert set(unet.state_dict()) != set(fcn.state_dict())
    assert not any(k.startswith("ups.") for k in fcn.state_dict())


# --- every network: shapes at awkward sizes, gradients, eval behaviour ---------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("height,width", [(1, 1), (17, 23), (16, 16), (5, 40), (2, 3)])
def test_forward_backward_shape(arch: str, height: int, width: int) -> None:
    torch.manual_seed(0)
    model = build_network(arch, {"in_channels": 2, "num_classes": 7, **TINY}).train()
    # N=2: in train mode a 1x1 bottleneck with N=1 would give BatchNorm one value per channel.
    x = torch.randn(2, 2, height, width, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 7, height, width)
    assert logits.dtype == torch.float32
    logits.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_shape_single_pixel_and_per_sample(arch: str) -> None:
    torch.manual_seed(0)
    model = _trained_bn(build_network(arch, TINY))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 1, 1)).shape == (1, 11, 1, 1)
        x = torch.randn(3, 3, *SIZE)
        first, second, alone = model(x), model(x), model(x[1:2])
    assert torch.equal(first, second)
    torch.testing.assert_close(alone, first[1:2], rtol=1e-4, atol=1e-5)
    # The logits vary over the image: not a constant broadcast of one value per class.
    assert first.std(dim=(-2, -1)).min() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_wrong_input_channels_named(arch: str) -> None:
    model = build_network(arch, TINY)
    with pytest.raises(ValueError, match=r"expects \(N, 3, H, W\) input, got \(1, 1, 8, 8\)"):
        model(torch.randn(1, 1, 8, 8))


# --- the exported model -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch: str, tmp_path) -> None:
    torch.manual_seed(0)
    config = network_config(arch, {"num_classes": len(CLASSES), **TINY})
    model = _trained_bn(build_model(config))
    dest = str(tmp_path / "model")
    modelio.save_model(dest, model.state_dict(), _spec(config, arch))

    on_disk = json.loads((tmp_path / "model" / modelio.CONFIG_FILE).read_text())
    assert on_disk["format"] == "segray-model/2" == modelio.FORMAT
    assert on_disk["arch"] == arch and on_disk["model"] == config.to_dict()

    loaded, spec = modelio.load_model(str(tmp_path))  # the run folder works as well as model/
    assert spec.arch == arch and spec.network == config and spec.num_classes == len(CLASSES)
    assert spec.classes == CLASSES and spec.input_size == SIZE
    assert type(loaded) is type(model) and not loaded.training
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, actual = model(x), loaded(x)
    assert actual.shape == (2, len(CLASSES), *SIZE)
    assert torch.equal(actual, expected)


def test_spec_defaults_to_the_unet() -> None:
    spec = modelio.ModelSpec(model=UNetConfig(base_channels=4).to_dict(), input_height=8, input_width=8)
    assert spec.arch == "unet" and spec.format == "segray-model/2"
    assert spec.network == UNetConfig(base_channels=4) and spec.num_classes == 11 == len(spec.classes)


def test_old_format_loads_as_unet(tmp_path) -> None:
    torch.manual_seed(0)
    config = UNetConfig(num_classes=len(CLASSES), **TINY)
    model = _trained_bn(build_model(config))
    folder = tmp_path / "model"
    folder.mkdir()
    torch.save(model.state_dict(), folder / modelio.WEIGHTS_FILE)
    # Exactly what the code before the registry wrote: no "arch".
    old = {"model": config.to_dict(), "input_height": SIZE[0], "input_width": SIZE[1], "classes": CLASSES,
           "palette": PALETTE, "void_index": 5, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
           "format": "segray-model/1"}
    (folder / modelio.CONFIG_FILE).write_text(json.dumps(old, indent=2) + "\n")

    loaded, spec = modelio.load_model(str(folder))
    assert type(loaded) is UNet
    assert spec.arch == "unet" and spec.network == config and spec.format == modelio.FORMAT
    assert (spec.void_index, spec.mean, spec.std) == (5, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _write_config(tmp_path, **changes) -> str:
    """An honest tiny U-Net export with config.json keys changed (None deletes); returns config.json's path."""
    config = UNetConfig(num_classes=len(CLASSES), **TINY)
    dest = str(tmp_path / "model")
    modelio.save_model(dest, build_model(config).state_dict(), _spec(config, "unet"))
    path = os.path.join(dest, modelio.CONFIG_FILE)
    raw = json.loads(open(path).read())
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    with open(path, "w") as f:
        json.dump(raw, f)
    return path


@pytest.mark.parametrize("arch", ["segnet", "", 3, None])
def test_unknown_arch_names_the_file_and_known_networks(tmp_path, arch) -> None:
    path = _write_config(tmp_path, arch=arch if arch is not None else ["unet"])
    shown = repr(arch if arch is not None else ["unet"])
    with pytest.raises(modelio.ModelError,
                       match=rf"^{re.escape(path)}: unknown network {re.escape(shown)}; known networks: fcn, unet"):
        modelio.load_spec(str(tmp_path))


def test_v2_without_arch_is_the_unet(tmp_path) -> None:
    _write_config(tmp_path, arch=None)
    assert modelio.load_spec(str(tmp_path)).arch == "unet"


def test_num_classes_must_match_classes(tmp_path) -> None:
    path = _write_config(tmp_path, model={"num_classes": 3, **TINY})
    with pytest.raises(modelio.ModelError, match=rf"^{re.escape(path)}: 5 classes listed but the network has num_classes=3"):
        modelio.load_spec(str(tmp_path))
    # Same in the old format: the default of 11 classes does not fit 5 class names either.
    path = _write_config(tmp_path, model=TINY, format="segray-model/1", arch=None)
    with pytest.raises(modelio.ModelError, match=r"5 classes listed but the network has num_classes=11"):
        modelio.load_model(str(tmp_path))


def test_bad_network_arguments_in_config_json(tmp_path) -> None:
    path = _write_config(tmp_path, model={**TINY, "num_classes": 5, "bilinear": True})
    with pytest.raises(modelio.ModelError, match=rf"^{re.escape(path)}: not a segray model config \(network 'unet': "
                                                  r"unknown arguments \['bilinear'\]"):
        modelio.load_spec(str(tmp_path))


@pytest.mark.parametrize("fmt", ["segray-model/3", "segray-model/0", None])
def test_other_formats_refused(tmp_path, fmt) -> None:
    path = _write_config(tmp_path, format=fmt)
    message = rf"^{re.escape(path)}: format {re.escape(repr(fmt))}, expected 'segray-model/2'"
    with pytest.raises(modelio.ModelError, match=message):
        modelio.load_spec(str(tmp_path))


def test_weights_of_another_network_refused(tmp_path) -> None:
    # An FCN's weights under arch "unet" (e.g. an export that forgot the arch): refused at load, not misused.
    config = FCNConfig(num_classes=len(CLASSES), **TINY)
    dest = str(tmp_path / "model")
    modelio.save_model(dest, build_model(config).state_dict(), _spec(config, "unet"))
    with pytest.raises(modelio.ModelError, match=r"model\.pt: the weights do not fit the network of config\.json unet"):
        modelio.load_model(dest)
