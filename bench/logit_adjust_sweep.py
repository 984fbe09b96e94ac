"""What ``train --logit-adjust TAU`` would score on a trained model, for several TAU, without retraining.

    python bench/logit_adjust_sweep.py --model /tmp/x/runs/w32emawd-xseq --data /tmp/x/xseq176 \
        [--taus 0,0.25,0.5,0.75,1,1.25] [--precision bf16] [--adapt-bn] [--prior-shift]

The model's logits on every frame of the dataset's val split (the frames validation scores) are
computed once; for each TAU, the confusion matrix of ``argmax(logits + logit_bias(TAU, w))``
gives mIoU, pixel accuracy and per-class IoU (segray.metrics), ``w`` being the class weights of
the model's run (``--class-weighting`` from its ``run.json``, counts from ``--data``'s
dataset.json; a model exported with a ``logit_bias`` is measured without it, from its bare
network). TAU 0 is the model's own validation figure, so the rows compare like for like.

``--prior-shift`` also adds, at each TAU, the log-ratio of the val split's class frequencies to
the training split's (the Bayes correction for a change of class prior: with the val labels'
own frequencies, an oracle; and with those EM estimates from the model's posteriors without
labels, Saerens et al. 2002, scaled by 0.25, 0.5, 1). On CamVid's unseen street both lost.

``--adapt-bn`` also measures test-time BatchNorm adaptation (AdaBN): the BatchNorm statistics
re-estimated on the val frames themselves (all of them, and the first 16) before the sweep; on
CamVid's unseen street it lost, docs/quality.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from segray import dataset, metrics, modelio, storage  # noqa: E402
from segray.precision import PRECISIONS, autocast, compute_precision  # noqa: E402
from segray.recipe import class_weights, logit_bias  # noqa: E402

CPU = torch.device("cpu")


def val_arrays(data: str) -> tuple[dataset.DatasetInfo, np.ndarray, np.ndarray]:
    info = dataset.load_info(data)
    table = pa.concat_tables([pq.read_table(f) for f in dataset.split_files(data, info, "val")])
    images, labels = dataset.rows_to_arrays(table.to_pydict(), info.height, info.width)
    return info, images.copy(), labels.copy()  # writable: torch.as_tensor would warn on each batch


def logits_of(net: torch.nn.Module, spec: modelio.ModelSpec, images: np.ndarray, precision: str) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), 8):
            x = modelio.images_to_tensor(images[i:i + 8], spec.mean, spec.std, channels_last=True)
            with autocast(CPU, precision):
                out.append(net(x).float())
    return torch.cat(out)


def adapted(net: torch.nn.Module, spec: modelio.ModelSpec, images: np.ndarray) -> torch.nn.Module:
    """A copy of ``net`` whose BatchNorm statistics are the plain averages over ``images``."""
    net = copy.deepcopy(net)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        for i in range(0, len(images), 4):
            net(modelio.images_to_tensor(images[i:i + 4], spec.mean, spec.std, channels_last=True))
    return net.eval()


def em_prior(posteriors: torch.Tensor, prior: torch.Tensor, steps: int = 30) -> torch.Tensor:
    """The class prior of the frames behind ``posteriors`` (N, K, H, W; computed under the
    training ``prior``), by the EM of Saerens et al. (2002): reweight, renormalise, average."""
    estimate = prior.clone()
    for _ in range(steps):
        r = posteriors * (estimate / prior).view(1, -1, 1, 1)
        estimate = (r / r.sum(1, keepdim=True)).mean((0, 2, 3))
    return estimate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a training run (its run.json names the class weighting)")
    ap.add_argument("--data", required=True, help="the prepared dataset whose val split is scored")
    ap.add_argument("--taus", default="0,0.25,0.5,0.75,1,1.25")
    ap.add_argument("--precision", choices=PRECISIONS, default="bf16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--adapt-bn", action="store_true")
    ap.add_argument("--prior-shift", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    recipe = json.loads(storage.read_bytes(storage.join(args.model, "run.json")))["recipe"]
    weighting = recipe["class_weighting"]
    model, spec = modelio.load_model(args.model)
    net = model.net if isinstance(model, modelio.LogitBias) else model
    net = net.to(memory_format=torch.channels_last)
    info, images, labels = val_arrays(args.data)
    weights = class_weights(weighting, info.class_pixel_counts)
    if weights is None:
        sys.exit(f"{args.model}: --class-weighting none: there is no weighting to adjust for")
    precision = compute_precision(args.precision, CPU)
    y = torch.as_tensor(labels).long()
    k = len(info.classes)
    print(f"{args.model} on {args.data} val ({len(images)} frames at {info.height}x{info.width}), "
          f"class weighting {weighting}, {precision}")
    print("| setting | TAU | mIoU | pixel acc. | " + " | ".join(info.classes) + " |")
    print("|---|---|---|---|" + "---|" * k)
    nets = [("model", net)]
    if args.adapt_bn:
        nets += [("AdaBN, all val frames", adapted(net, spec, images)), ("AdaBN, 16 frames", adapted(net, spec, images[:16]))]
    train_prior = torch.tensor(info.class_pixel_counts, dtype=torch.float64)
    train_prior = (train_prior / train_prior.sum()).float()
    true_prior = torch.bincount(y[y != info.void_index], minlength=k).float()
    true_shift = torch.log(true_prior.clamp_min(1e-6) / train_prior).view(1, -1, 1, 1)
    for name, n in nets:
        logits = logits_of(n, spec, images, precision)
        for tau in (float(t) for t in args.taus.split(",")):
            adjusted = logits + torch.tensor(logit_bias(tau, weights) or [0.0] * k).view(1, -1, 1, 1)
            rows = [(name, adjusted)]
            if args.prior_shift:
                rows.append((f"{name}, val's true prior", adjusted + true_shift))
                shift = torch.log(em_prior(adjusted.softmax(1), train_prior) / train_prior).view(1, -1, 1, 1)
                rows += [(f"{name}, EM prior x{a:g}", adjusted + a * shift) for a in (0.25, 0.5, 1.0)]
            for label, out in rows:
                cm = metrics.confusion_matrix(y, out.argmax(1), k, info.void_index)
                iou = " | ".join(f"{v:.3f}" for v in metrics.iou_per_class(cm))
                print(f"| {label} | {tau:g} | {metrics.mean_iou(cm):.4f} | {metrics.pixel_accuracy(cm):.4f} | {iou} |")


if __name__ == "__main__":
    main()
