"""Does adapting the network's BatchNorm statistics help a few-label model on a new street? (issue 13)

    PYTHONPATH=. python scripts/bn_adaptation.py ../shared/data/camvid STEPS SEED OUT

Trains the shipped round on N=20 scribbled images of CamVid ``train_no_0006R0`` (the label-efficiency benchmark's
subset and scribbles) for STEPS steps on one thread, saves the weights to ``OUT.pt`` (reused when there), then scores
the same weights on ``seq_0006R0`` and ``val`` with the BatchNorm statistics

- as trained (``plain``, what is served);
- re-estimated, cumulatively, on whole unaugmented images at working scale: the 20 labelled ones, 64 of the pool,
  or 64 of ``seq_0006R0`` itself (``recal-*``);
- mixed per test image with that image's own statistics, ``n0 / (n0 + 1)`` of the trained ones (``perimage-n0=*``;
  Schneider et al., NeurIPS 2020); a 1x1 input (ASPP's pooling branch) keeps the trained ones.

Writes one record per split and variant to ``OUT.json``.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from labelsmart import config, imageio
from labelsmart.bench.label_efficiency import _classes, make_labels, select_subset
from labelsmart.datasets import DataFolder, evaluate
from labelsmart.training import round as training_round
from labelsmart.training.model import build_model
from labelsmart.training.validation import predict_mask


class MixedStats(torch.nn.Module):
    """A BatchNorm that normalises with ``w`` x its running statistics + ``1 - w`` x the input's own."""

    def __init__(self, bn: torch.nn.BatchNorm2d, n0: float) -> None:
        super().__init__()
        self.bn = bn
        self.w = n0 / (n0 + 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.bn.running_mean, self.bn.running_var
        if x.shape[2] * x.shape[3] > 1:
            mean = self.w * mean + (1 - self.w) * x.mean(dim=(0, 2, 3))
            var = self.w * var + (1 - self.w) * x.var(dim=(0, 2, 3), unbiased=False)
        return torch.nn.functional.batch_norm(x, mean, var, self.bn.weight, self.bn.bias, False, 0.0, self.bn.eps)


def mixed(model: torch.nn.Module, n0: float) -> torch.nn.Module:
    model = copy.deepcopy(model)

    def swap(parent: torch.nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(parent, name, MixedStats(child, n0))
            else:
                swap(child)

    swap(model)
    return model.eval()


def recalibrated(model: torch.nn.Module, images: list[np.ndarray], pp: config.PreprocessConfig) -> torch.nn.Module:
    """A copy whose BatchNorm statistics are the cumulative average over ``images`` (batches of 8, same size)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    xs = [torch.from_numpy(imageio.prepare(image, pp)[0])[None] for image in images]
    with torch.no_grad():
        for i in range(0, len(xs), 8):
            model(torch.cat(xs[i : i + 8]))
    return model.eval()


def main(pool_path: str, steps: int, seed: int, out: str) -> None:
    torch.set_num_threads(1)
    cfg = config.load(
        {"train.threads": 1, "train.seed": seed, "train.val_every": 0, "train.max_round_seconds": 0.0}, env={}
    )
    pool = DataFolder.open(pool_path, "--pool")
    pool_names = pool.names("train_no_0006R0")
    names = select_subset(pool_names, 20)
    position = {n: i for i, n in enumerate(pool_names)}
    labelled = sorted(
        zip(names, [make_labels(pool.read(n)[1], "scribble") for n in names], strict=True), key=lambda t: position[t[0]]
    )
    classes = _classes(pool)
    weights = Path(out + ".pt")
    weights.parent.mkdir(parents=True, exist_ok=True)
    if weights.is_file():
        model = build_model(cfg.model, len(classes))
        model.load_state_dict(torch.load(weights))
    else:
        data = training_round.RoundData(train=[(pool.read_image(n), m) for n, m in labelled], classes=classes)
        t0 = time.time()
        result = training_round.run_round(cfg, data, 1, steps=steps)
        print(f"trained {result.steps} steps in {time.time() - t0:.1f} s", flush=True)
        model = result.model
        torch.save(model.state_dict(), weights)
    model.eval()
    pp, device = cfg.preprocess, torch.device("cpu")
    variants = {
        "plain": model,
        "recal-labelled": recalibrated(model, [pool.read_image(n) for n in names], pp),
        "recal-pool64": recalibrated(
            model, [pool.read_image(n) for n in np.random.default_rng(0).choice(pool_names, 64, replace=False)], pp
        ),
        **{f"perimage-n0={n0:g}": mixed(model, n0) for n0 in (1.0, 4.0, 16.0)},
    }
    rows = []
    for split in ("seq_0006R0", "val"):
        split_names = pool.names(split)
        these = dict(variants)
        if split == "seq_0006R0":
            drawn = np.random.default_rng(1).choice(split_names, 64, replace=False)
            these["recal-target64"] = recalibrated(model, [pool.read_image(n) for n in drawn], pp)
        for name, m in these.items():
            res = evaluate(lambda image, m=m: predict_mask(m, image, pp, device), pool, split_names)
            rows.append(
                {"split": split, "variant": name, "miou": round(100 * res["miou"], 1), "steps": steps, "seed": seed}
            )
            print(rows[-1], flush=True)
    Path(out + ".json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
