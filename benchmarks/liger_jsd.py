"""GPU: potstill's fused chunked GJSD vs Liger-Kernel's fused linear JSD (Triton) vs dense full logits.

    python benchmarks/liger_jsd.py                 # needs CUDA and `pip install liger-kernel`
    python benchmarks/liger_jsd.py --n 4096 --v 32000 --h 512 --dtype float32

All three compute GJSD(β) between student and teacher through their output heads (hidden → logits), summed
over labelled positions and divided by their count, then backward to the student's hidden states and head.
"""
from __future__ import annotations

import argparse

import torch

from loss_memory import cuda_forward_backward  # benchmarks/ is the script's directory, hence on sys.path
from potstill.losses.chunked import fused_loss, resolve_chunk_size
from potstill.losses.objective import parse_objective
from potstill.losses.targets import TeacherHidden


def inputs(n, v, h, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to("cuda", dtype)  # noqa: E731
    labels = torch.randint(0, v, (n,), generator=g).cuda()
    return make(n, h).requires_grad_(), make(v, h, scale=h**-0.5).requires_grad_(), make(n, h), make(v, h, scale=h**-0.5), labels


def potstill_loss(beta, chunk, compiled=False):
    objective = parse_objective(f"gjsd(beta={beta})")

    def run(x, w, tx, tw, labels):
        out = fused_loss(x, w, None, labels, objective, TeacherHidden(tx, tw), chunk_size=chunk, compiled=compiled)
        return out.total / out.n_valid

    return run


def liger_loss(beta):
    from liger_kernel.transformers import LigerFusedLinearJSD

    fn = LigerFusedLinearJSD(jsd_beta=beta)
    return lambda x, w, tx, tw, labels: fn(x, w, tx, tw, labels)


def dense_loss(beta):
    from potstill.losses.divergences import generalized_jsd

    def run(x, w, tx, tw, labels):
        logq = torch.log_softmax((x @ w.T).float(), -1)
        logp = torch.log_softmax((tx @ tw.T).float(), -1)
        return generalized_jsd(logq, logp, beta).mean()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--v", type=int, default=151936)
    parser.add_argument("--h", type=int, default=2048)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--chunk", type=int, default=0)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    chunk = resolve_chunk_size(args.chunk, args.v, "cuda")
    chunk_compiled = resolve_chunk_size(args.chunk, args.v, "cuda", compiled=True)
    data = inputs(args.n, args.v, args.h, dtype)
    runs = {"dense": dense_loss(args.beta),
            f"potstill fused, eager (chunk {chunk})": potstill_loss(args.beta, chunk),
            f"potstill fused, compiled (chunk {chunk_compiled})": potstill_loss(args.beta, chunk_compiled, True),
            "Liger fused linear JSD": liger_loss(args.beta)}
    rows = {name: cuda_forward_backward(fn, data, args.reps) for name, fn in runs.items()}
    base = rows["dense"]
    print(f"GJSD(beta={args.beta}) N={args.n} V={args.v} H={args.h} {args.dtype}, forward+backward, best of {args.reps}, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| path | loss | s | vs dense | peak MB | vs dense |\n|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['loss']:.5f} | {r['seconds']:.4f} | {r['seconds'] / base['seconds']:.2f}x | {r['peak_mb']:.0f} "
              f"| {r['peak_mb'] / base['peak_mb']:.2f}x |"
              .replace("nan", "OOM"))


if __name__ == "__main__":
    main()
