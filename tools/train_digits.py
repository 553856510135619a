#!/usr/bin/env python
"""Train a small RepVGG on scikit-learn's digits and export its TRAINING-TIME form to ONNX.

This gives `onnxrep optimize` and `onnxrep bench` a real, trained multi-branch network and a
labelled test set, so accuracy before/after (and after --int8) is measured on data, not noise:

    python tools/train_digits.py --out out/digits
    python -m onnxrep optimize out/digits/digits_train.onnx out/digits/digits_deploy.onnx
    python -m onnxrep bench out/digits/digits_train.onnx out/digits/digits_deploy.onnx \\
        --data out/digits/inputs.npz --labels out/digits/labels.npy --batch 1,32 --int8

Data: sklearn.datasets.load_digits (1797 8x8 grey images, 10 classes), a stratified 80/20 split,
pixels scaled to [0, 1], upsampled to SIZE x SIZE (bilinear) and standardized with the training
mean/std (1 channel, or the same image repeated over 3). CPU only, one thread: well under a minute
of CPU time.

Writes, in --out:
  digits_train.onnx   the training-time graph (3x3 + 1x1 + identity branches with BatchNorm), legacy
                      exporter (dynamo=False), do_constant_folding=True, opset 17, dynamic batch axis
  inputs.npz          the test split, keyed by the ONNX input name ("input"), float32 (N, C, SIZE, SIZE)
  labels.npy          the test labels, int64 (N,)
It prints the test accuracy of the PyTorch model and of the exported ONNX model (ONNX Runtime).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.repvgg import RepVGG  # noqa: E402

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def load_split(size: int, channels: int, seed: int):
    """(x_train, y_train, x_test, y_test) as float32 NCHW / int64 arrays, standardized on the train split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0  # (N, 8, 8), pixels 0..16
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)

    def up(a: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(a)[:, None]  # (N, 1, 8, 8)
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        return t.repeat(1, channels, 1, 1).numpy()

    x_tr, x_te = up(x_tr), up(x_te)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    return ((x_tr - mean) / std).astype(np.float32), y_tr, ((x_te - mean) / std).astype(np.float32), y_te


def evaluate(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    return float((logits.argmax(1).numpy() == y).mean())


def train(model, x_tr, y_tr, epochs: int, batch: int, lr: float, seed: int, shift: int) -> None:
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(xt) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=g)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            xb, yb = xt[idx], yt[idx]
            if shift:  # random translation by up to `shift` pixels: cheap augmentation
                dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=g))
                xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            total += len(idx)
        print(f"epoch {epoch + 1:2d}/{epochs}: loss {loss_sum / total:.4f}, train accuracy {correct / total:.4f}",
              flush=True)


def export(model: torch.nn.Module, path: Path, channels: int, size: int) -> None:
    model.eval()
    dummy = torch.zeros(1, channels, size, size)
    with warnings.catch_warnings():  # the legacy exporter is deliberate: it is the form users export
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (dummy,), str(path), dynamo=False, do_constant_folding=True, opset_version=17,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray, torch_logits: np.ndarray) -> tuple[float, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {INPUT_NAME: x})[0]
    return float((logits.argmax(1) == y).mean()), float(np.abs(logits - torch_logits).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/digits", help="output directory (default out/digits)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    p.add_argument("--batch", type=int, default=64, help="training batch size (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, one-cycle AdamW (default 3e-3)")
    p.add_argument("--size", type=int, default=32, help="image side after upsampling (default 32)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="input channels (default 1)")
    p.add_argument("--widths", type=_ints, default=(16, 32, 64), help="stem and stage widths (default 16,32,64)")
    p.add_argument("--depths", type=_ints, default=(2, 3), help="blocks per stage (default 2,3)")
    p.add_argument("--groups", type=int, default=1, help="groups of the odd-numbered blocks (default 1)")
    p.add_argument("--shift", type=int, default=2, help="random translation augmentation, pixels (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed for split, init and batches (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: this network is so small that more threads only add "
                        "synchronisation, and on a busy machine they make training many times slower)")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    x_tr, y_tr, x_te, y_te = load_split(args.size, args.channels, args.seed)
    print(f"digits: {len(x_tr)} train / {len(x_te)} test images, {args.channels}x{args.size}x{args.size}")
    model = RepVGG(in_ch=args.channels, widths=args.widths, depths=args.depths, groups=args.groups, num_classes=10)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: RepVGG widths={list(args.widths)} depths={list(args.depths)} groups={args.groups}, "
          f"{model.num_blocks} blocks, {n_params} parameters (training-time form)")

    t0 = time.perf_counter()
    train(model, x_tr, y_tr, args.epochs, args.batch, args.lr, args.seed, args.shift)
    print(f"trained in {time.perf_counter() - t0:.1f} s")

    acc = evaluate(model, x_te, y_te)
    print(f"test accuracy (PyTorch): {acc:.4f}")

    onnx_path = out / "digits_train.onnx"
    export(model, onnx_path, args.channels, args.size)
    with torch.no_grad():
        ref = model(torch.from_numpy(x_te)).numpy()
    onnx_acc, diff = onnx_accuracy(onnx_path, x_te, y_te, ref)
    print(f"test accuracy (ONNX Runtime, {onnx_path.name}): {onnx_acc:.4f}; max |logit difference| vs PyTorch {diff:.2e}")

    np.savez(out / "inputs.npz", **{INPUT_NAME: x_te})
    np.save(out / "labels.npy", y_te)
    print(f"wrote {onnx_path}, {out / 'inputs.npz'} (key {INPUT_NAME!r}), {out / 'labels.npy'}")
    print("next:\n"
          f"  python -m onnxrep optimize {onnx_path} {out / 'digits_deploy.onnx'}\n"
          f"  python -m onnxrep bench {onnx_path} {out / 'digits_deploy.onnx'} --data {out / 'inputs.npz'} "
          f"--labels {out / 'labels.npy'} --batch 1,32 --int8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
