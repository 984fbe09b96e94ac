"""``train --precision`` (segray/worker.py): what each value means on a CPU and a GPU, and that a
bf16 epoch really computes its convolutions in bf16 while weights, optimizer state and loss stay
fp32. The job end to end (a resume that switches to bf16, recorded per epoch in metrics.json):
tests/test_train_e2e.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segray import precision as prec
from segray import worker
from segray.model import build_network
from segray.recipe import Augmentation, make_scheduler
from segray.train import PRECISIONS, TrainConfig, TrainError  # the flag's choices, re-exported

CPU, GPU = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native", [True, False])
def test_what_each_precision_means_on_each_device(monkeypatch, native):
    monkeypatch.setattr(prec, "native_bf16_cpu", lambda: native)
    assert prec.compute_precision("auto", CPU) == "fp32"  # the default on a CPU is unchanged
    assert prec.compute_precision("fp32", CPU) == "fp32"
    assert prec.compute_precision("bf16", CPU) == ("bf16" if native else "fp32")  # never emulated
    for precision, expected in (("auto", "bf16"), ("bf16", "bf16"), ("fp32", "fp32")):
        assert prec.compute_precision(precision, GPU) == expected, precision
    with pytest.raises(ValueError, match="precision 'fp16' is unknown"):
        prec.compute_precision("fp16", CPU)


def test_native_bf16_is_what_the_cpu_reports():
    cpu = torch.cpu
    assert prec.native_bf16_cpu() == bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())


def test_an_unknown_precision_is_refused_naming_the_flag(tmp_path):
    assert PRECISIONS == ("auto", "bf16", "fp32")
    with pytest.raises(TrainError, match=r"--precision 'fp16' is unknown; valid: auto, bf16, fp32"):
        TrainConfig(data=str(tmp_path), storage=str(tmp_path), name="x", precision="fp16")


def _epoch(precision: str, seen: list):
    torch.manual_seed(0)
    model = build_network("unet", {"num_classes": 5, "base_channels": 4, "depth": 2})
    if precision == "bf16":
        model = model.to(memory_format=torch.channels_last)
    model.inc[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = make_scheduler(opt, 3e-3, "constant", [[0.0, 1.0], [1.0, 1.0]], 0, 3)
    rng = np.random.default_rng(0)
    shard = (rng.integers(0, 255, (6, 16, 24, 3), dtype=np.uint8), rng.integers(0, 6, (6, 16, 24), dtype=np.uint8))
    batches = list(worker.array_batches(shard, 2, np.arange(6), CPU, precision == "bf16"))
    aug = Augmentation(enabled=True, crop=(16, 16), jitter=0.2)
    totals = worker.train_one_epoch(model, opt, sched, batches, None, 1, aug, CPU, 5, 3, precision=precision)
    cm, loss = worker.evaluate(model, batches, None, CPU, 5, 5, precision)
    return model, opt, totals, cm, loss, int((shard[1] != 5).sum())


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_a_bf16_epoch_computes_in_bf16_and_keeps_fp32_weights(precision, dtype):
    seen: list = []
    model, opt, totals, cm, loss, labelled = _epoch(precision, seen)
    assert seen == [dtype] * 6  # 3 training steps, then 3 validation batches
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {v.dtype for s in opt.state.values() for v in s.values() if v.is_floating_point()} == {torch.float32}
    assert totals.dtype == torch.float64 and torch.isfinite(totals).all() and totals[2] == 6
    assert int(cm.sum()) == labelled  # every pixel but the void ones (label 5), scored once
    assert loss.dtype == torch.float64 and torch.isfinite(loss).all()


def test_bf16_and_fp32_epochs_train_the_same_model_closely():
    """bf16 changes rounding, not the computation: after the same three steps from the same
    weights, the two models agree to bf16's precision."""
    a = _epoch("fp32", [])[0].state_dict()
    b = _epoch("bf16", [])[0].state_dict()
    for k, v in a.items():
        if v.is_floating_point():
            assert torch.allclose(v, b[k], atol=0.05, rtol=0.05), k


@pytest.mark.parametrize("options", [{}, {"tta": "flip", "scales": (0.75, 1.0)}, {"tta": "flip", "tile": (16, 24)}])
def test_infer_precision_bf16_runs_every_pass_in_bf16_on_a_cpu_with_native_bf16(tmp_path, options):
    """``infer --precision bf16`` on this CPU: every pass of the replica (flipped, scaled, tiled
    too) under bf16 autocast where the CPU has native bf16, else fp32; the masks agree with fp32's
    but for a few argmax ties; the default (auto) stays fp32 on a CPU."""
    import pyarrow as pa

    from segray import frames as load_stage
    from segray import predictor as predict_stage
    from test_infer import listing_table
    from test_infer_e2e import encode
    from test_infer_tta import conv_loader

    rng = np.random.default_rng(2)
    table, root = listing_table(tmp_path, {f"f{k}.png": encode(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
                                           for k in range(3)})
    frames = pa.concat_tables(load_stage.load_frames(table, None if options.get("tile") else (16, 24), root))
    masks, seen = {}, {}
    for precision in ("auto", "fp32", "bf16"):
        dtypes: list = []

        def loader(uri, device):
            model, spec = conv_loader(uri, device)
            model.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
            return model, spec

        replica = predict_stage.Predictor("m", loader=loader, threads=1, precision=precision, **options)
        masks[precision] = [np.frombuffer(m, np.uint8) for m in replica(frames).column("pred").to_pylist()]
        seen[precision] = set(dtypes)
    assert seen["auto"] == seen["fp32"] == {torch.float32}
    assert seen["bf16"] == {torch.bfloat16 if prec.native_bf16_cpu() else torch.float32}
    assert all(np.array_equal(a, b) for a, b in zip(masks["auto"], masks["fp32"]))
    agree = np.mean([np.mean(a == b) for a, b in zip(masks["fp32"], masks["bf16"])])
    assert agree > 0.9, agree  # bf16 moves a few argmax ties, no more


def test_an_unknown_infer_precision_is_refused_naming_the_flag():
    from segray.infer import InferConfig, InferError

    with pytest.raises(InferError, match=r"--precision 'half' is unknown; valid: auto, bf16, fp32"):
        InferConfig(model="m", images="i", output="o", precision="half")
