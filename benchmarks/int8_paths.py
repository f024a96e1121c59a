"""Throughput and logit error of fp32 / bf16 / int8 inference paths on one CPU thread.

Usage: ``python benchmarks/int8_paths.py [--width 0.25] [--batch 32] [--pt2e]``. The model is
``polynet_small`` with random weights whose BatchNorm statistics are recomputed on the data,
so activations have realistic ranges; ``--pt2e`` also times torchao's PT2E x86 path compiled
with Inductor (minutes of compilation).
"""

from __future__ import annotations

import argparse
import time

import torch

import polynet
from polynet.inference.fuse import optimize_for_inference


def _rate(fn, x: torch.Tensor, seconds: float = 3.0) -> float:
    fn(x)
    fn(x)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(x)
        n += 1
    return n * len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pt2e", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = polynet.create_model("polynet_small", width_mult=args.width)
    size = model.pretrained_cfg["input_size"]
    data = [torch.randn(args.batch, *size) for _ in range(3)]
    model.train()
    with torch.no_grad():  # BN statistics from the data: realistic activation ranges
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        for x in data:
            model(x)
    model.eval()
    x = data[-1]
    with torch.no_grad():
        ref = model(x)
        candidates = {
            "fp32 fused": optimize_for_inference(model),
            "bf16 fused": optimize_for_inference(model, precision="bf16"),
            "bf16 unpacked": optimize_for_inference(model, precision="bf16", prepack=False),
            "int8 onnxruntime": optimize_for_inference(
                model, precision="int8", calibration=data[:2]
            ),
        }
        candidates["fp32 onnxruntime"] = _onnx_fp32(model, x)
        if args.pt2e:
            candidates["int8 pt2e inductor"] = _pt2e(model, data[:2])
        base = None
        for name, fn in candidates.items():
            rate = _rate(fn, x)
            base = base or rate
            err = float((fn(x).float() - ref).abs().max())
            agree = float((fn(x).argmax(1) == ref.argmax(1)).float().mean())
            print(
                f"{name:20s} {rate:8.1f} img/s  {rate / base:5.2f}x  max|dlogit| {err:.3g}  "
                f"top-1 agreement {agree:.3f}"
            )


def _onnx_fp32(model: torch.nn.Module, x: torch.Tensor):
    """The same fused graph in ONNX Runtime at fp32: how much of int8's gain is the runtime."""
    from polynet.inference.quantize import onnx_runtime_model

    return onnx_runtime_model(optimize_for_inference(model, prepack=False), tuple(x.shape[1:]))


def _pt2e(model: torch.nn.Module, calibration: list[torch.Tensor]):
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    fused = optimize_for_inference(model, prepack=False)
    quantizer = xiq.X86InductorQuantizer().set_global(
        xiq.get_default_x86_inductor_quantization_config()
    )
    graph = torch.export.export(fused, (calibration[0],)).module()
    prepared = prepare_pt2e(graph, quantizer)
    for batch in calibration:
        prepared(batch)
    converted = convert_pt2e(prepared)
    start = time.perf_counter()
    compiled = torch.compile(converted)
    compiled(calibration[0])
    print(f"pt2e: compiled in {time.perf_counter() - start:.0f} s")
    return compiled


if __name__ == "__main__":
    main()
