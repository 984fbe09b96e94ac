"""``train --ema`` (segray/averaging.py): the moving average's arithmetic, its warm-up, BatchNorm's
integer counter, and the swap that validates the average and gives the trained weights back. The
job end to end (the average validated, checkpointed as ``model`` and exported; the trained
weights resumed from ``trained``): tests/test_train_e2e.py."""

from __future__ import annotations

import pytest
import torch

from segray.averaging import WeightAverage, decay_at
from segray.train import TrainConfig, TrainError


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def test_warm_up_then_the_decay():
    assert decay_at(0.999, 1) == pytest.approx(2 / 11)
    assert decay_at(0.999, 10) == pytest.approx(11 / 20)
    assert decay_at(0.9, 89) == pytest.approx(0.9) and decay_at(0.9, 10_000) == 0.9
    assert all(decay_at(0.99, t) <= decay_at(0.99, t + 1) for t in range(1, 500))


def test_each_update_moves_the_average_towards_the_weights_by_one_minus_the_decay():
    net = _net()
    avg = WeightAverage(net, 0.5)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    expected = {k: v.clone() for k, v in start.items()}
    for t in range(1, 4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
            net[1].running_mean.add_(2.0)
            net[1].num_batches_tracked.add_(5)
        avg.update(net)
        d = decay_at(0.5, t)
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                expected[k] = d * expected[k] + (1 - d) * v
            else:
                expected[k] = v.clone()  # the integer batch counter is copied, not averaged
    assert avg.step == 3
    for k, v in avg.state.items():
        assert torch.allclose(v, expected[k], atol=1e-6), k
    assert avg.state["1.num_batches_tracked"].item() == 15
    assert not torch.allclose(avg.state["0.weight"], net.state_dict()["0.weight"])  # it lags


def test_the_average_is_a_copy_and_resumes_from_a_saved_state_and_step():
    net = _net()
    avg = WeightAverage(net, 0.9)
    with torch.no_grad():
        net[0].weight.zero_()
    assert avg.state["0.weight"].abs().sum() > 0  # not the network's own tensors
    resumed = WeightAverage(_net(), 0.9, state=avg.state, step=120)
    assert resumed.step == 120 and all(torch.equal(resumed.state[k], v) for k, v in avg.state.items())
    assert resumed.state["0.weight"] is not avg.state["0.weight"]


def test_swapped_into_validates_the_average_and_gives_the_trained_weights_back():
    net = _net()
    avg = WeightAverage(net, 0.9)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    trained = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    with avg.swapped_into(net) as inside:
        assert inside is net
        assert all(torch.equal(net.state_dict()[k], v) for k, v in avg.state.items())
        net.eval()
        out_avg = net(x)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in trained.items())
    with pytest.raises(RuntimeError, match="boom"):
        with avg.swapped_into(net):
            raise RuntimeError("boom")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in trained.items())  # back after an error too
    assert not torch.allclose(out_avg, net.eval()(x))


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_a_decay_outside_0_1_is_refused_naming_the_flag(tmp_path, decay):
    with pytest.raises(TrainError, match=r"--ema must be 0 \(off\) or a decay in \(0, 1\)"):
        TrainConfig(data=str(tmp_path), storage=str(tmp_path), name="x", ema=decay)
    with pytest.raises(ValueError, match="--ema must be between 0 and 1"):
        WeightAverage(_net(), decay)
