"""Full CPU benchmark: ``python benchmarks/run_bench.py [polynet bench options]``.

Same as ``polynet bench``; by default writes benchmarks/results/bench.json and bench.md.
"""

import sys

from polynet.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--json" not in args:
        args += ["--json", "benchmarks/results/bench.json"]
    if "--markdown" not in args:
        args += ["--markdown", "benchmarks/results/bench.md"]
    sys.exit(main(["bench", *args]))
