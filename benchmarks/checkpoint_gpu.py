"""Why checkpointing is slow on a GPU: step time and peak memory of its variants, then profiles.

Batch 16 at 331 px (the paper's per-GPU load), bf16 autocast, channels_last, CUDA only:
plain; per-unit checkpointing as shipped; without RNG-state preservation; without restoring
the units' buffers after the recomputation; timm's ``checkpoint_seq``; then the CUDA and CPU
time of one plain and one checkpointed step. docs/benchmarks.md quotes its H200 output.

    python benchmarks/checkpoint_gpu.py
"""

import time
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from timm.models._manipulate import checkpoint_seq
from torch.profiler import ProfilerActivity, profile

import polynet.model.regional as pr
from polynet.model.zoo import create_model

torch.backends.cudnn.benchmark = True
m = create_model("polynet_very_deep").cuda().to(memory_format=torch.channels_last).train()
opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9, nesterov=True)
x = torch.randn(16, 3, 331, 331, device="cuda").contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 1000, (16,), device="cuda")


def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(m(x), y)
    loss.backward()
    opt.step()


def measure(label, n=6):
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / n * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"{label:40s} {ms:8.1f} ms/step  peak {peak:.2f} GiB", flush=True)
    return ms


base = measure("plain")
m.set_grad_checkpointing(True)
measure("ckpt (per unit, buffers restored)")
orig_ckpt = pr.checkpoint
pr.checkpoint = partial(orig_ckpt, preserve_rng_state=False)
measure("ckpt, no rng preservation")
pr.checkpoint = orig_ckpt
orig_ctx = pr._recompute_contexts
pr._recompute_contexts = lambda unit: (nullcontext(), nullcontext())
measure("ckpt, no buffer restore")
pr._recompute_contexts = orig_ctx
orig_stage = pr.Stage._checkpointed
pr.Stage._checkpointed = lambda self, h: checkpoint_seq(self, h)
measure("ckpt, timm checkpoint_seq (old)")
pr.Stage._checkpointed = orig_stage
m.set_grad_checkpointing(False)
measure("plain again")
m.set_grad_checkpointing(True)
for label, on in (("plain", False), ("ckpt", True)):
    m.set_grad_checkpointing(on)
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        step()
        torch.cuda.synchronize()
    print("==", label)
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))
