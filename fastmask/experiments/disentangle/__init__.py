"""`fastmask run disentangle`: disentangled representations of text by masking a frozen transformer (Zhang, van de
Meent, Wallace, EMNLP 2021), one mask per factor, all K masks learned in one forward pass.

* Model: a frozen encoder (all-MiniLM-L6-v2 offline; any Hugging Face encoder id or folder via ``--model``);
  ``fastmask.apply`` with ``MaskConfig(n_masks=K)`` over the attention/MLP linear layers of its top ``top_blocks``
  transformer blocks (0: every block; ``--granularity weight | unit_in | unit_out``), estimator ``threshold_st``
  (the paper's), ``hard_concrete`` or ``gumbel_sigmoid_st``. The representation z_k is the attention-masked mean
  of the last hidden states under mask k.
* Top-block caching: the blocks below the masked ones are frozen and unmasked, so their output (the input of the
  first masked block) is computed once per text (and cached on disk as knowledge's are: ``..blocks``), and every
  forward, the unmasked baseline's included, runs from it (the lower blocks swapped for pass-throughs). A step costs the
  masked blocks only: measured on the shared 2-core CPU (1 thread, 48 texts of <= 24 tokens, K = 2, weight masks)
  0.7 s with the top 2 blocks and 1.2 s with the top 3, against 1.5-1.7 s for 36 texts through all 6 blocks.
* One step: B anchors; per factor k a positive (same value of factor k; with ``triplet_sampling=contrast`` also a
  different value of the other factors) and a negative (other value of factor k; contrast: the same other factors);
  the K groups (anchors, positives, negatives) run as ONE batch with ``fm.mask_index(encoder, "grouped")`` (group k
  through mask k). Loss = sum_k [ CE(head_k(z_k(anchor)), y_k) + triplet_weight * max(0, |z_a - z_p| - |z_a - z_n|
  + margin) + l0_weight * expected density of mask k ] + overlap_weight * mean over gates of the product of the K
  masks' keep probabilities (pairs, for K > 2).
* Magnitude pruning (the paper prunes, then masks): the smallest-magnitude weights of the masked layers (globally
  or per layer, an exact fraction) are set to zero in the frozen weight before the masks are learned. Multiplying
  the frozen weight by a fixed 0/1 mask is the clean way here: the weights are frozen anyway, so a pruned weight
  can never come back, it needs no extra parameters or frozen logits (which Adam's state and the L0 penalty would
  still count), it works for every granularity and estimator, and the masked model's sparsity is then the union
  of the pruned weights and the closed gates. The unmasked baseline uses the unpruned model.
* Evaluation (all on frozen features, eval-mode gates): fresh logistic-regression probes per representation (each
  mask, the unmasked model, the adversarial baseline per factor) and per factor, trained on a balanced
  (uncorrelated) probe split and scored on a balanced test split: the leakage table (own factor high, others near
  chance 0.5), and the same table with MLP probes (one hidden layer, early stopping on a dev split held out of the
  probe split: what a linear probe misses may still be recoverable). Robustness: a probe for a representation's
  own factor trained on the CORRELATED training split (factors agree on ``train_agreement`` of it) and tested on the
  SHIFTED split (agreement 1 - train_agreement): a representation that carries the other factor lets the probe
  lean on it and loses accuracy there. A sparsity-vs-disentanglement curve: masks retrained (``sweep_steps``) at
  each pruning sparsity of the sweep.
* Adversarial-removal baseline (gradient reversal), per factor k: an MLP over the frozen unmasked features trained on
  the same training split to predict factor k while adversaries predicting the other factors see its output
  through a gradient-reversal layer (a deviation from fine-tuning the whole encoder adversarially, for CPU budget;
  it removes the factor from the pooled representation the same way).
* Fine-tuned baseline, per factor k: a fresh copy of the encoder whose masked blocks (the same top blocks; their
  input cached the same way) are fine-tuned with a linear head for factor k (cross-entropy, ``finetune_steps``).
* Seeds (``--seeds 0,1,2``, seeds.py): the whole run (data split, masks, baselines, probes, sweep) once per seed in
  ``<out>/seed-<s>/`` (each resumable from its checkpoints; ``--resume`` skips finished seeds), then the mean and the
  95% t-interval over the seeds of every figure (``fastmask.experiments.stats``) in ``<out>``'s metrics.json,
  report.md (seed_report.py) and plots with error bars. Without ``--seeds``: one run of ``--seed`` in ``<out>``.
* Data (``--data``, see data.py): ``tweets`` (default; the paper's setting 2, toxicity x dialect) or
  ``reviews`` (an offline stand-in for setting 1, sentiment x genre: Pang & Lee sentence polarity x the aspect a
  sentence talks about, acting or story, from a keyword lexicon). Split sizes, max_length, the mask lr, the CE
  weight and the sweep default per setting (config.SETTING_DEFAULTS).
* Setting 3, ``--data syntax`` (semantics vs syntax; syntax.py, syntax_eval.py, syntax_run.py, syntax_report.py):
  mask 0 learned with triplets of MRPC paraphrase pairs (positive: the paraphrase; negative: a lexically close
  sentence of another pair), mask 1 with triplets of UD English-EWT sentences sharing a top-level dependency template
  (the root's UPOS and its non-punctuation dependents' UPOS in order), triplet losses only (``ce_weight`` 0), in the
  same grouped forward, checkpoints and seeds machinery. Scored per representation (each mask, the unmasked encoder,
  a fine-tuned baseline per factor trained with that factor's triplet loss): MRPC test paraphrase AUC and F1 (the
  threshold picked on a dev split of train) from cosines, and on EWT test nearest-neighbour same-template accuracy,
  the neighbours' template edit distance and a linear probe of the root's UPOS. No adversarial baseline, shifted
  split or pruning sweep there (no class labels to remove or shift).
* Not implemented: fine-tuning the whole encoder when ``top_blocks`` > 0; pruning WITH masking (gradual); the
  paper's genre labels (IMDB reviews with genre: not reachable offline) and its setting-3 data (ParaNMT: not
  reachable offline; MRPC and EWT stand in).
"""

from __future__ import annotations

from .config import EXPERIMENT, DisentangleConfig
from .train import add_arguments, run_experiment, run_from_args

# The entry points `fastmask run disentangle` uses; the rest is in the submodules (config, data, model, evaluate,
# train, report).
__all__ = ["EXPERIMENT", "DisentangleConfig", "add_arguments", "run_experiment", "run_from_args"]
