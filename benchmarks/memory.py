"""Peak memory of training (or inference) steps, one fresh subprocess per candidate.

    python benchmarks/memory.py --mode train polynet polynet-ckpt port

Prints one JSON line per candidate: peak RSS while the steps run and RSS before them (MiB).
"""

import argparse
import json

from polynet.bench import CANDIDATES, BenchConfig, measure_memory

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidates", nargs="+", choices=CANDIDATES)
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--image-size", type=int, default=331)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cfg = BenchConfig(image_size=args.image_size, batch_size=args.batch_size, threads=args.threads)
    for name in args.candidates:
        row = dict(candidate=name, mode=args.mode, **measure_memory(cfg, name, args.mode))
        print(json.dumps(row), flush=True)
