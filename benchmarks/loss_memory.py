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


def _inputs(n, v, h, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device, dtype)  # noqa: E731
    hidden = make(n, h).requires_grad_()
    weight = make(v, h, scale=h**-0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    return hidden, weight, make(n, h), make(v, h, scale=h**-0.5), labels


def _dense(objective, hidden, weight, t_hidden, t_weight, labels, chunk=None):
    """The straightforward path: full (N, V) student and teacher logits, autograd through everything."""
    from potstill.losses.chunked import chunk_term_sums

    z = (hidden @ weight.T).float()
    t = (t_hidden @ t_weight.T).float()
    sums = chunk_term_sums(z, labels, torch.ones(labels.shape[0], device=z.device), t, objective)
    return (sums * torch.tensor([term.weight for term in objective.terms], device=z.device)).sum()


def _floor(objective, hidden, weight, t_hidden, t_weight, labels, chunk):
    """The matmul-only floor: the fused path's chunk loop with its 4 matmuls per chunk (student z = h·Wᵀ, teacher
    z_t = h_t·W_tᵀ, dL/dh = dz·W, dL/dW += dzᵀ·h) and no elementwise work (dz := z). No fused loss can beat it."""
    from potstill.losses.chunked import resolve_chunk_size

    chunk = resolve_chunk_size(chunk, weight.shape[0], weight.device)
    h, w = hidden.detach(), weight.detach()
    grad_h, grad_w = torch.zeros_like(h), torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    total = torch.zeros((), device=h.device)
    for start in range(0, h.shape[0], chunk):
        sl = slice(start, start + chunk)
        z = h[sl] @ w.T
        total += (t_hidden[sl] @ t_weight.T)[:, 0].sum()
        grad_h[sl] = z @ w
        grad_w.addmm_(z.T, h[sl])
    hidden.grad, weight.grad = grad_h, grad_w.to(weight.dtype)
    return total.requires_grad_()


def _fused(objective, hidden, weight, t_hidden, t_weight, labels, chunk, compiled=False):
    from potstill.losses.chunked import fused_loss
    from potstill.losses.targets import TeacherHidden

    return fused_loss(hidden, weight, None, labels, objective, TeacherHidden(t_hidden, t_weight), chunk_size=chunk,
                      compiled=compiled).total


def _fused_compiled(objective, *inputs):
    return _fused(objective, *inputs, compiled=True)


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
        loss = PATHS[path](objective, *inputs, chunk)
        loss.backward()
        times.append(time.perf_counter() - start)
    # min(times) is the steady state; for the compiled path times[0] - min(times) is the compile cost
    queue.put({"peak_mb": _rss_mb() - base, "seconds": min(times), "first_s": times[0], "loss": loss.item()})


PATHS = {"dense": _dense, "fused": _fused, "floor": _floor, "compiled": _fused_compiled}


def cuda_forward_backward(fn, args, reps: int) -> dict:
    """Best-of-``reps`` time (CUDA events, after one warm-up) and allocator peak of ``fn(*args).backward()``;
    args[0] and args[1] are the leaves whose gradients are reset. An out-of-memory is a result (nan)."""
    times, value = [], None
    for rep in range(reps + 1):
        for t in args[:2]:
            t.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            loss = fn(*args)
            loss.backward()
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {"peak_mb": float("nan"), "seconds": float("nan"), "loss": float("nan"), "oom": True}
        end.record()
        torch.cuda.synchronize()
        if rep:
            times.append(start.elapsed_time(end) / 1000)
        value = loss.item()
    return {"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20, "seconds": min(times), "loss": value}


def measure_cuda(path, objective_text, n, v, h, chunk, reps, dtype) -> dict:
    from potstill.losses.objective import parse_objective

    objective = parse_objective(objective_text)
    inputs = _inputs(n, v, h, device="cuda", dtype=dtype)
    fn = lambda *a: PATHS[path](objective, *a, chunk)  # noqa: E731
    return cuda_forward_backward(fn, inputs, reps)


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
    parser.add_argument("--chunk", type=int, default=0, help="positions per chunk; 0 = the auto size training uses")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--objectives", nargs="*", default=None, help="default: every registered one")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    parser.add_argument("--device", default="cpu", help="cpu (peak RSS per subprocess) or cuda (allocator peak)")
    parser.add_argument("--dtype", default="float32", help="hidden/head dtype: float32 or bfloat16 (logits are fp32)")
    parser.add_argument("--compile", action="store_true", help="also time the fused path with loss.compile=true "
                        "(steady state = best rep; compile s = first rep − best, CPU only)")
    args = parser.parse_args()
    from potstill import list_divergences
    from potstill.losses.chunked import resolve_chunk_size

    names = args.objectives or [d["name"] for d in list_divergences()]
    rows = []
    run = lambda path, name: (measure_cuda(path, name, args.n, args.v, args.h, args.chunk, args.reps, getattr(torch, args.dtype))  # noqa: E731
                              if args.device == "cuda" else measure(path, name, args.n, args.v, args.h, args.chunk, args.reps))
    floor = run("floor", names[0])  # the same for every objective: no elementwise work
    for name in names:
        dense, fused = run("dense", name), run("fused", name)
        tol = 1e-3 if args.dtype == "float32" else 2e-2
        if not dense.get("oom"):
            assert abs(dense["loss"] - fused["loss"]) <= tol * max(1.0, abs(dense["loss"])), (name, dense, fused)
        rows.append({"objective": name, "dense_s": dense["seconds"], "fused_s": fused["seconds"], "floor_s": floor["seconds"],
                     "dense_mb": dense["peak_mb"], "fused_mb": fused["peak_mb"]})
        if args.compile:
            compiled = run("compiled", name)
            assert abs(compiled["loss"] - fused["loss"]) <= tol * max(1.0, abs(fused["loss"])), (name, fused, compiled)
            rows[-1].update(compiled_s=compiled["seconds"], compile_s=compiled.get("first_s", float("nan")) - compiled["seconds"])
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"N={args.n} V={args.v} H={args.h} {args.dtype}, chunk={resolve_chunk_size(args.chunk, args.v, args.device)}, forward+backward, best of {args.reps}, "
          f"torch {torch.__version__}, {where}")
    print(f"matmul-only floor (4 matmuls per chunk, no elementwise work): {floor['seconds']:.3f} s")
    print("| objective | dense s | fused s | time ratio | fused ÷ floor | dense peak MB | fused peak MB | memory ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:  # a dense OOM shows as nan: the fused path ran where dense could not
        print(f"| {r['objective']} | {r['dense_s']:.3f} | {r['fused_s']:.3f} | {r['fused_s'] / r['dense_s']:.2f}x "
              f"| {r['fused_s'] / r['floor_s']:.2f}x "
              f"| {r['dense_mb']:.0f} | {r['fused_mb']:.0f} | {r['fused_mb'] / r['dense_mb']:.2f}x |".replace("nan", "OOM"))
    if args.compile:
        print("\n| objective | compiled s | compiled ÷ floor | compile s (first rep − best) |\n|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['objective']} | {r['compiled_s']:.3f} | {r['compiled_s'] / r['floor_s']:.2f}x | {r['compile_s']:.1f} |")


if __name__ == "__main__":
    main()
