"""One training step of a random-init GPT-2 (124M, XL), per configuration and each in its own process:
dense bf16 and dense AMP fine-tuning, naive mask learning (torch.nn.utils.parametrize) and fastmask mask learning,
with the loss-trajectory check of fastmask against naive. The logic is fastmask/bench/model.py; this script is
`fastmask bench model` with the same flags:

    python benchmarks/bench_model_step.py --out benchmarks/results       # GPU; on a CPU: the tiny GPT-2 check
"""

import sys

from fastmask.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "model", *sys.argv[1:]]))
