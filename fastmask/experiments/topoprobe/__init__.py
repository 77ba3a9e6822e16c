"""`fastmask run topoprobe`: structural and tree-topological probes per layer, and probe-regularised fine-tuning
(Li, Yin, Lin, "Rethinking the Construction of Effective Metrics for Understanding the Mechanisms of Pretrained
Language Models", Findings of EMNLP 2023; released code cclx/Effective_Metrics), plus the classic structural
probes (Hewitt & Manning 2019) it builds on.

* Per layer L (0 = embeddings) of a frozen HF encoder, depth probes n_i = ||B h_i||^2 (rank = hidden / 2) trained
  with an MSE against gold UD depths (X_sp: word pieces inherit their word's depth, root = 1), against
  tree-topological pseudo-labels of their own predictions (X_ssp) and against those labels reversed in position
  (X_essp); each metric is the validation MSE. Alongside: depth Spearman and root accuracy of the X_sp probe, and a
  distance probe with UUAS and distance Spearman (H&M: lengths 5-50, punctuation out of UUAS / root accuracy), and
  the diagnostics (mean / std of n - label per depth level).
* Padding: by default only word pieces enter every loss; ``--include-padding`` replays the released code, whose
  MSE runs over the padded batch ([CLS], [SEP] and padding included; target 2.0 for X_sp). The paper's figures were
  made that way (see fastmask.probing.probes).
* Fine-tuning on CoLA: cross-entropy (``--class-weighted``: weighted by class) + ``probe_weight`` x the pseudo-label
  loss of a depth probe at layer L (initialised from that layer's X_ssp probe, trained jointly, acceptable sentences
  only; the released code's weight is 10), for each layer of the sweep and each seed, against plain fine-tuning with
  the same seeds. The in-domain dev set gives the corpus-level Matthews correlation and the mean of per-batch (32)
  MCCs that the released code reports.
* ``--masks PATH``: the same probes on the subnetwork of fastmask masks (``fm.load_masks`` patches the model with
  the saved MaskConfig; eval-mode gates), beside the full model.

Budget: the defaults fit a few minutes of a 2-core CPU on the packaged all-MiniLM-L6-v2; ``--full`` is the paper's
setting (every treebank sentence, validation on the test split, every layer and 10 seeds of 3 CoLA epochs at lr
2e-5). Every finished unit (a layer's probes, a fine-tuning run) is written to ``units/`` at once; ``--resume`` skips
the finished ones.
"""

from .config import EXPERIMENT, TopoprobeConfig
from .train import add_arguments, run_experiment, run_from_args

__all__ = ["EXPERIMENT", "TopoprobeConfig", "add_arguments", "run_experiment", "run_from_args"]
