"""U-Net: shapes at awkward sizes, gradients, size, config round-trip, memory formats."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from segray.model import IBN, ModelConfigError, PyramidPooling, UNet, UNetConfig, build_model, count_parameters

# Tiny width so every test runs in milliseconds on a CPU; the wiring is the same at 64.
SMALL = UNetConfig(base_channels=4)


@pytest.fixture
def model() -> UNet:
    torch.manual_seed(0)
    return build_model(SMALL)


# Odd, prime, already-divisible and degenerate sizes; 2**depth = 16.
SIZES = [(37, 53), (17, 31), (16, 16), (1, 1), (5, 40)]


@pytest.mark.parametrize("height,width", SIZES)
def test_forward_backward_shape(model: UNet, height: int, width: int) -> None:
    model.train()
    # N=2: in train mode a 1x1 bottleneck with N=1 would give BatchNorm one value per channel.
    x = torch.randn(2, 3, height, width, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, SMALL.num_classes, height, width)
    assert logits.dtype == torch.float32
    logits.square().mean().backward()
    first_conv = model.inc[0]
    assert isinstance(first_conv, nn.Conv2d)
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters())


def test_paper_size_parameter_count() -> None:
    # On the meta device: only shapes are made, no 124 MB of weights, no forward pass.
    with torch.device("meta"):
        unet = build_model(UNetConfig(base_channels=64))
    assert count_parameters(unet) == pytest.approx(31.0e6, rel=0.01)


def test_config_round_trip() -> None:
    config = UNetConfig(in_channels=1, num_classes=5, base_channels=8, depth=3)
    assert UNetConfig.from_dict(config.to_dict()) == config
    assert UNetConfig.from_dict({}) == UNetConfig()
    assert build_model(config).config == config


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="bilinear"):
        UNetConfig.from_dict({"base_channels": 8, "bilinear": True})
    with pytest.raises(ValueError, match="depth"):
        UNetConfig(depth=0)


def test_wrong_input_channels_named(model: UNet) -> None:
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(1, 1, 16, 16))


def test_channels_last_matches_contiguous(model: UNet) -> None:
    model.eval()
    x = torch.randn(2, 3, 37, 53)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
        actual = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_eval_is_deterministic_and_per_sample(model: UNet) -> None:
    model.eval()
    x = torch.randn(3, 3, 21, 29)
    with torch.no_grad():
        first, second = model(x), model(x)
        alone = model(x[1:2])
    assert torch.equal(first, second)
    # Eval BatchNorm uses running statistics, so a sample's logits do not depend on its batch.
    torch.testing.assert_close(alone, first[1:2], rtol=1e-4, atol=1e-5)


def test_autocast_bf16(model: UNet) -> None:
    model.eval()
    x = torch.randn(2, 3, 37, 53).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.shape == (2, SMALL.num_classes, 37, 53)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()


def test_sync_batchnorm_conversion(model: UNet) -> None:
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    converted.eval()
    with torch.no_grad():
        assert converted(torch.randn(1, 3, 37, 53)).shape == (1, SMALL.num_classes, 37, 53)


def test_dropout_drops_channels_in_training_only_and_adds_no_weights():
    torch.manual_seed(0)
    plain, dropped = build_model(UNetConfig(base_channels=4, depth=2)), build_model(
        UNetConfig(base_channels=4, depth=2, dropout=0.5))
    assert plain.state_dict().keys() == dropped.state_dict().keys()  # loads either way
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 16, 24)
    plain.eval(), dropped.eval()
    assert torch.equal(plain(x), dropped(x))  # eval: no dropout
    dropped.train(), plain.train()
    assert not torch.allclose(plain(x), dropped(x))  # training: channels dropped at the bottleneck
    assert UNetConfig.from_dict(UNetConfig(dropout=0.2).to_dict()).dropout == 0.2
    for bad in (1.0, -0.1, True, "0.2"):
        with pytest.raises(ModelConfigError, match="dropout must be a number in"):
            UNetConfig(dropout=bad)


def test_ibn_normalises_half_the_channels_per_frame_and_sits_in_the_first_levels_only():
    torch.manual_seed(0)
    layer = IBN(6).train()
    x = torch.randn(2, 6, 8, 12)
    y = layer(x)
    # The instance-norm half: each frame's channel has mean 0 and variance 1 over H, W, whatever
    # the frame's contrast and brightness (a per-frame affine change of the input leaves it).
    assert torch.allclose(y[:, :3].mean((2, 3)), torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(y[:, :3].var((2, 3), unbiased=False), torch.ones(2, 3), atol=1e-3)
    z = layer(torch.cat([x[:1] * 3 + 2, x[1:] * 0.5 - 1]))
    assert torch.allclose(z[:, :3], y[:, :3], atol=1e-4)
    assert not torch.allclose(z[:, 3:], y[:, 3:], atol=1e-2)  # the BatchNorm half sees the change
    assert layer(x.contiguous(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)

    net = build_model(UNetConfig(base_channels=4, depth=3, ibn=2))
    ibn_at = [name for name, m in net.named_modules() if isinstance(m, IBN)]
    assert ibn_at == ["inc.1", "downs.0.1.1"]  # the first norm of levels 0 and 1, nothing deeper
    assert build_model(UNetConfig(base_channels=4, depth=3)).state_dict().keys() == \
        build_model(UNetConfig(base_channels=4, depth=3, ibn=0)).state_dict().keys()
    assert net(torch.randn(1, 3, 16, 24)).shape == (1, 11, 16, 24)
    assert UNetConfig.from_dict(UNetConfig(ibn=3).to_dict()).ibn == 3
    for bad in (-1, 6, True, 1.5):
        with pytest.raises(ModelConfigError, match="ibn must be an int from 0 to depth"):
            UNetConfig(depth=4, ibn=bad)


def test_pyramid_pooling_gives_every_pixel_the_whole_frame_and_keeps_the_shape():
    torch.manual_seed(0)
    layer = PyramidPooling(8).eval()
    x = torch.randn(2, 8, 6, 9)
    y = layer(x)
    assert y.shape == x.shape
    # A change in one corner reaches the opposite corner (a plain 1x1 fusion would not).
    x2 = x.clone()
    x2[:, :, 0, 0] += 5.0
    assert not torch.allclose(layer(x2)[:, :, -1, -1], y[:, :, -1, -1])
    assert layer(x.contiguous(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
    assert layer(torch.randn(1, 8, 1, 1)).shape == (1, 8, 1, 1)

    plain, ppm = build_model(UNetConfig(base_channels=4, depth=3)), build_model(UNetConfig(base_channels=4, depth=3, ppm=1))
    assert not any(k.startswith("context.") for k in plain.state_dict())  # earlier models load as before
    assert {k.split(".")[0] for k in ppm.state_dict()} - {k.split(".")[0] for k in plain.state_dict()} == {"context"}
    assert ppm.eval()(torch.randn(1, 3, 37, 53)).shape == (1, 11, 37, 53)
    assert UNetConfig.from_dict(UNetConfig(ppm=1).to_dict()).ppm == 1
    for bad in (2, -1, True, 0.5, "1"):
        with pytest.raises(ModelConfigError, match="ppm must be 0"):
            UNetConfig(ppm=bad)
