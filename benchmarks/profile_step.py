"""Where a training step's time goes: convolutions against everything else, ours and the port's.

Profiles one training step (forward, backward, SGD step) of ``polynet_very_deep`` in
channels_last and of the released port (NCHW, our weights), alternately in one process, and
prints the step time and the self time of the convolution kernels (forward and backward).
This is the measurement behind docs/benchmarks.md's "why the training target is out of reach".

    python benchmarks/profile_step.py [--image-size 331] [--batch-size 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from polynet.bench import BenchConfig, build_candidates

CONV_KERNELS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::cudnn_convolution")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=331)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(
        image_size=args.image_size, batch_size=args.batch_size, candidates=("polynet", "port")
    )
    models = build_candidates(cfg)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 1000, (args.batch_size,))

    def make_step(name: str, model: torch.nn.Module):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, nesterov=True)
        inp = x if name == "port" else x.contiguous(memory_format=torch.channels_last)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(inp), y).backward()
            opt.step()

        return step

    steps = {name: make_step(name, model) for name, model in models.items()}
    for step in steps.values():
        step()  # warm-up: optimizer state, oneDNN primitive caches
    for _ in range(args.rounds):
        for name, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                step()
                seconds = time.perf_counter() - start
            events = prof.key_averages()
            conv = sum(e.self_cpu_time_total for e in events if e.key in CONV_KERNELS) / 1e6
            total = sum(e.self_cpu_time_total for e in events) / 1e6
            print(f"{name:8s} step {seconds:6.2f} s   convolutions {conv:6.2f} s   "
                  f"everything else {total - conv:5.2f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
