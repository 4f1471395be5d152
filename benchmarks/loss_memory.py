"""Peak memory and time of potstill's fused chunked loss vs a dense full-logit path (same process family).

    python benchmarks/loss_memory.py                  # N=4096 positions, V=32k, H=512, fp32, CPU
    python benchmarks/loss_memory.py --n 1024 --v 8000 --reps 1   # a quick look

Each (objective, path) runs in a fresh subprocess so peak RSS (ru_maxrss) isolates its own working set:
reported memory = peak RSS during forward+backward minus RSS after the inputs were allocated. Both paths
compute the same thing: student logits from hidden states through the output head, teacher logits from the
teacher's hidden states and head, the objective summed over tokens, and gradients w.r.t. hidden and head.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

import torch
import torch.nn.functional as F


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _inputs(n, v, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_()
    t_hidden = torch.randn(n, h, generator=g)
    t_weight = torch.randn(v, h, generator=g) / h**0.5
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, t_hidden, t_weight, labels


def _dense(objective, hidden, weight, t_hidden, t_weight, labels):
    """The straightforward path: full (N, V) student and teacher logits, autograd through everything."""
    from potstill.losses.chunked import chunk_term_sums

    z = hidden @ weight.T
    t = t_hidden @ t_weight.T
    sums = chunk_term_sums(z, labels, torch.ones(labels.shape[0]), t, objective)
    return (sums * torch.tensor([term.weight for term in objective.terms])).sum()


def _fused(objective, hidden, weight, t_hidden, t_weight, labels, chunk):
    from potstill.losses.chunked import fused_loss
    from potstill.losses.targets import TeacherHidden

    return fused_loss(hidden, weight, None, labels, objective, TeacherHidden(t_hidden, t_weight), chunk_size=chunk).total


def _measure(path, objective_text, n, v, h, chunk, reps, queue):
    from potstill.losses.objective import parse_objective

    torch.set_num_threads(torch.get_num_threads())
    objective = parse_objective(objective_text)
    inputs = _inputs(n, v, h)
    base = _rss_mb()
    times = []
    for _ in range(reps):
        for x in inputs[:2]:
            x.grad = None
        start = time.perf_counter()
        loss = _dense(objective, *inputs) if path == "dense" else _fused(objective, *inputs, chunk)
        loss.backward()
        times.append(time.perf_counter() - start)
    queue.put({"peak_mb": _rss_mb() - base, "seconds": min(times), "loss": loss.item()})


def measure(path, objective, n, v, h, chunk, reps) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(path, objective, n, v, h, chunk, reps, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--h", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--objectives", nargs="*", default=None, help="default: every registered one")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    args = parser.parse_args()
    from potstill import list_divergences

    names = args.objectives or [d["name"] for d in list_divergences()]
    rows = []
    for name in names:
        dense = measure("dense", name, args.n, args.v, args.h, args.chunk, args.reps)
        fused = measure("fused", name, args.n, args.v, args.h, args.chunk, args.reps)
        assert abs(dense["loss"] - fused["loss"]) <= 1e-3 * max(1.0, abs(dense["loss"])), (name, dense, fused)
        rows.append({"objective": name, "dense_s": dense["seconds"], "fused_s": fused["seconds"],
                     "dense_mb": dense["peak_mb"], "fused_mb": fused["peak_mb"]})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"N={args.n} V={args.v} H={args.h} fp32, chunk={args.chunk}, forward+backward, best of {args.reps}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| objective | dense s | fused s | time ratio | dense peak MB | fused peak MB | memory ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['objective']} | {r['dense_s']:.3f} | {r['fused_s']:.3f} | {r['fused_s'] / r['dense_s']:.2f}x "
              f"| {r['dense_mb']:.0f} | {r['fused_mb']:.0f} | {r['fused_mb'] / r['dense_mb']:.2f}x |")


if __name__ == "__main__":
    main()
