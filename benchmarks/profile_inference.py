"""Where an inference batch's time goes in the fast path: convolutions against everything else.

Profiles one batch of ``optimize_for_inference(polynet_very_deep, precision=...)`` (random
weights, channels_last) after two untimed batches and prints the self CPU time of the
convolution kernels and of the ten costliest other ops. Everything outside the convolutions
bounds what removing or fusing the rest could gain: at most ``total / convolutions``.

    python benchmarks/profile_inference.py [--precision bf16] [--image-size 331] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from polynet import create_model
from polynet.inference.fuse import optimize_for_inference

CONV_KERNELS = ("mkldnn::_convolution_pointwise", "aten::mkldnn_convolution", "aten::convolution")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--image-size", type=int, default=331)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = optimize_for_inference(create_model("polynet_very_deep"), precision=args.precision)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    x = x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        start = time.perf_counter()
        model(x)
        print(f"one batch: {time.perf_counter() - start:.3f} s")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
    self_us = Counter({e.key: e.self_cpu_time_total for e in prof.key_averages()})
    total = sum(self_us.values())
    conv = sum(t for k, t in self_us.items() if k in CONV_KERNELS)
    print(
        f"{args.precision}, {args.image_size} px, batch {args.batch_size}, {args.threads} "
        f"threads: convolutions {100 * conv / total:.1f} % of {total / 1e3:.0f} ms self CPU "
        f"time; removing everything else would gain at most {total / conv:.2f}x"
    )
    for key, t in (self_us - Counter({k: self_us[k] for k in CONV_KERNELS})).most_common(10):
        print(f"  {key:40s} {100 * t / total:5.1f} %")


if __name__ == "__main__":
    main()
