"""``train --logit-adjust TAU`` (segray/recipe.py logit_bias): the bias it computes, validation's
argmax with it (segray/worker.py evaluate), the exported model that carries it
(segray/modelio.py LogitBias, ``logit_bias`` in config.json) and the refusals. The job end to
end (validated and exported with the bias, a resume with another TAU refused):
tests/test_train_e2e.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from segray import modelio
from segray.model import build_model, network_config
from segray.recipe import class_weights, logit_bias
from segray.runrecord import resume_refusal
from segray.train import TrainConfig, TrainError
from segray.worker import evaluate

CLASSES = ["sky", "road", "pole"]
PALETTE = [[0, 0, 255], [128, 64, 128], [255, 255, 0]]


class Fixed(torch.nn.Module):
    """Logits known in advance: the same (C,) scores at every pixel of every image."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = torch.tensor(scores).view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores.expand(x.shape[0], -1, x.shape[2], x.shape[3]).clone()


def test_the_bias_is_minus_tau_log_of_each_class_weight():
    w = [0.25, 1.0, 4.0]
    assert logit_bias(1.0, w) == pytest.approx((math.log(4), 0.0, -math.log(4)))
    assert logit_bias(0.5, w) == pytest.approx((math.log(2), 0.0, -math.log(2)))
    assert logit_bias(0.0, w) is None and logit_bias(1.0, None) is None
    # With the weights training uses: the rarest class is pushed down most, the commonest up.
    counts = [5000, 3000, 40]
    bias = logit_bias(1.0, class_weights("sqrt_median_freq", counts))
    assert bias[2] < bias[1] < bias[0] and all(math.isfinite(b) for b in bias)
    # TAU 1 cancels the weights: softmax(logits + bias) is the weighted posterior divided by w.
    weights = class_weights("sqrt_median_freq", counts)
    logits = torch.tensor([0.3, -1.0, 2.0])
    adjusted = torch.softmax(logits + torch.tensor(bias), 0)
    expected = torch.softmax(logits, 0) / torch.tensor(weights)
    assert torch.allclose(adjusted, expected / expected.sum(), atol=1e-6)


def test_validation_takes_the_argmax_after_the_bias_and_the_loss_before_it():
    x = torch.zeros(2, 3, 4, 5)
    y = torch.full((2, 4, 5), 1, dtype=torch.long)  # every pixel is road
    y[:, 0, 0] = 255  # void: neither counted nor scored
    model = Fixed([-0.5, -0.2, 0.1])  # pole scores highest, road second
    cm, loss = evaluate(model, [(x, y)], None, torch.device("cpu"), 3, 255)
    assert cm[1].tolist() == [0, 0, 38] and cm.sum() == 38  # all called pole
    bias = torch.tensor([0.0, 0.0, -0.5])  # pole pushed down by more than its lead over road
    cm_b, loss_b = evaluate(model, [(x, y)], None, torch.device("cpu"), 3, 255, bias=bias)
    assert cm_b[1].tolist() == [0, 38, 0]
    assert torch.equal(loss_b, loss)  # the validation loss is the network's, not the adjusted scores'


def _save(tmp_path, bias) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(0)
    config = network_config("unet", {"num_classes": 3, "base_channels": 4, "depth": 2})
    net = build_model(config).eval()
    spec = modelio.ModelSpec(model=config.to_dict(), input_height=8, input_width=12, classes=CLASSES,
                             palette=PALETTE, logit_bias=bias)
    modelio.save_model(str(tmp_path / "model"), net.state_dict(), spec)
    return str(tmp_path), net


def test_the_exported_model_adds_its_bias_and_without_one_is_the_bare_network(tmp_path):
    bias = [0.7, 0.0, -1.3]
    uri, net = _save(tmp_path / "a", bias)
    assert json.loads((tmp_path / "a" / "model" / "config.json").read_text())["logit_bias"] == bias
    model, spec = modelio.load_model(uri)
    assert isinstance(model, modelio.LogitBias) and spec.logit_bias == bias and not model.training
    x = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = net(x) + torch.tensor(bias).view(1, 3, 1, 1)
        assert torch.allclose(model(x), expected, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # infer's bf16: the sum leaves as float32
            assert model(x).dtype == torch.float32
    assert model.net.state_dict().keys() == net.state_dict().keys()

    uri, net = _save(tmp_path / "b", None)
    model, spec = modelio.load_model(uri)
    assert spec.logit_bias is None and type(model) is type(net)
    # A config.json from before the field: the same.
    config = tmp_path / "b" / "model" / "config.json"
    raw = json.loads(config.read_text())
    del raw["logit_bias"]
    config.write_text(json.dumps(raw))
    assert modelio.load_spec(uri).logit_bias is None


@pytest.mark.parametrize("bad", [[1.0, 2.0], [0.0, "x", 1.0], [0.0, float("nan"), 1.0], [True, 0.0, 0.0], 3.0])
def test_a_bad_bias_in_config_json_is_refused_naming_the_file(tmp_path, bad):
    uri, _ = _save(tmp_path, None)
    config = tmp_path / "model" / "config.json"
    raw = json.loads(config.read_text())
    raw["logit_bias"] = bad
    config.write_text(json.dumps(raw))
    with pytest.raises(modelio.ModelError) as e:
        modelio.load_spec(uri)
    assert str(config) in str(e.value) and "logit_bias must be null or 3 finite numbers" in str(e.value)


def test_the_flag_is_checked_and_is_part_of_the_recipe():
    def config(**kw):
        return TrainConfig(data="d", storage="s", name="n", **kw)

    assert config(logit_adjust=1).logit_adjust == 1 and config().logit_adjust == 0
    for bad in (-0.5, 11, float("nan"), "1"):
        with pytest.raises(TrainError, match="--logit-adjust must be a number from 0"):
            config(logit_adjust=bad)
    with pytest.raises(TrainError, match="--class-weighting none has none"):
        config(logit_adjust=1.0, class_weighting="none")
    recorded, now = {"logit_adjust": 1.0}, {"logit_adjust": 0.5}
    assert "--logit-adjust was 1.0, this command has 0.5" in resume_refusal("r", recorded, now)
    assert resume_refusal("r", {}, now) is None  # a run from before the flag: not compared


def test_tau_one_undoes_the_weights_on_a_model_that_learned_the_weighted_posterior():
    """The claim of the help text on numbers: a classifier whose scores are log(w_c p(c|x)), what a
    w-weighted cross-entropy converges to, predicts argmax p(c|x) again after TAU 1."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1.0, 1.0, 1.0], size=500)
    w = np.array([0.5, 1.0, 3.0])
    scores = torch.tensor(np.log(p * w)).float()
    bias = torch.tensor(logit_bias(1.0, w)).float()
    assert ((scores + bias).argmax(1).numpy() == p.argmax(1)).all()
    assert (scores.argmax(1).numpy() != p.argmax(1)).sum() > 20  # the weighted argmax differs


@pytest.mark.parametrize("tta", [None, "flip"])
def test_infer_predicts_with_the_exported_bias(tmp_path, tta):
    """infer's replica (segray/predictor.py) loads the model through modelio: its masks are the
    argmax of the biased logits, with and without a test-time option."""
    from segray.predictor import Predictor

    bias = [-0.55, 0.3, 0.0]  # the untrained network calls every pixel sky by ~0.3
    uri, net = _save(tmp_path, bias)
    images = np.random.default_rng(1).integers(0, 256, (3, 8, 12, 3), dtype=np.uint8)
    x = modelio.images_to_tensor(images)
    with torch.no_grad():
        raw = net(x)
        if tta:
            raw = (raw + net(x.flip(-1)).flip(-1)) / 2
    expected = (raw + torch.tensor(bias).view(1, 3, 1, 1)).argmax(1).numpy()
    masks = Predictor(uri, threads=1, tta=tta, precision="fp32").predict(images)
    assert (masks == expected).mean() > 0.999 and (masks != raw.argmax(1).numpy()).any()
