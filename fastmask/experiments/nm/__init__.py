"""`fastmask run nm`: learned N:M (2:4) sparsity masks against one-shot magnitude and Wanda masks (MaskLLM: Fang et
al., "MaskLLM: Learnable Semi-Structured Sparsity for Large Language Models", NeurIPS 2024; Wanda: Sun et al., "A
Simple and Effective Pruning Approach for Large Language Models", ICLR 2024).

* Every attention and MLP projection of the causal LM gets N:M sparsity along its input dimension.
* One-shot baselines: keep the n largest of every m consecutive weights by |W| (magnitude) or by |W| ||X_j||_2
  (Wanda, input norms from calibration blocks of the training text).
* Learned: fastmask.MaskConfig(granularity="nm") logits (out, in / m, C(m, n)) initialised from a one-shot mask
  (the paper's prior; --learn-from, default wanda), trained with the LM loss through straight-through
  Gumbel-softmax samples (temperature annealed), evaluated with the argmax pattern (exactly N:M).
* WikiText-2 perplexity of dense, each one-shot and each learned mask. Offline the data folder has no train split:
  training on the validation split, evaluation on the test split.

Budget: the defaults (100 steps of 2 x 128 tokens, one mask learned from Wanda's) are sized for about 15 min on a
2-core CPU (docs/experiments/nm.md has the measured runs, and the older defaults under which learned masks came out
far worse than their priors); the paper trains 2,000 steps on 64 A100s. Resumable per unit (units/,
learned-<prior>/ checkpoints).
"""

from .config import EXPERIMENT, NMConfig
from .train import add_arguments, run_experiment, run_from_args

__all__ = ["EXPERIMENT", "NMConfig", "add_arguments", "run_experiment", "run_from_args"]
