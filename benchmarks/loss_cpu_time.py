"""CPU time (``time.process_time``, 1 thread) of the fused loss's forward + backward per objective and of the
matmul-only floor, in one process: a measure that other processes sharing the cores disturb far less than wall
time (benchmarks/loss_memory.py measures wall time and memory).

    python benchmarks/loss_cpu_time.py 512 ce fkl gjsd      # N = 512, V = 32000, H = 512, fp32, best of 2
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loss_memory as lm  # noqa: E402

from potstill.losses.objective import parse_objective  # noqa: E402


def best_cpu_time(path: str, objective, inputs, reps: int = 2) -> float:
    out = float("inf")
    for _ in range(reps):
        for x in inputs[:2]:
            x.grad = None
        start = time.process_time()
        lm.PATHS[path](objective, *inputs, 0).backward()
        out = min(out, time.process_time() - start)
    return out


def main() -> None:
    torch.set_num_threads(1)
    n, names = int(sys.argv[1]), sys.argv[2:]
    inputs = lm._inputs(n, 32000, 512)
    floor = best_cpu_time("floor", parse_objective("fkl"), inputs)
    print(f"floor {floor:.3f} s")
    for name in names:
        seconds = best_cpu_time("fused", parse_objective(name), inputs)
        print(f"| {name} | {seconds:.3f} | {seconds / floor:.2f}x |")


if __name__ == "__main__":
    main()
