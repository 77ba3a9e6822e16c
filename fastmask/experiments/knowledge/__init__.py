"""`fastmask run knowledge`: knowledge-critical subnetworks of a causal LM (Bayazit et al., EMNLP 2024), on fused masks.

Find a sparse subnetwork whose REMOVAL makes the model forget one piece of relational knowledge (a TargetKG: the
WordNet hypernym triplets under a synset, e.g. building.n.01) while it keeps other knowledge (ControlKG) and its
language modelling (WikiText-2):

* Mask: one logit per weight of the attention and MLP projections of the top ``top_k_layers`` blocks (GPT-2 c_attn,
  c_proj, c_fc; Llama q/k/v/o, gate/up/down), weights frozen, dropout off; Gumbel-sigmoid straight-through
  (temperature 1, hard threshold 0.5), logits initialised to logit(init_keep) (the paper: 0.45; the CPU-budget
  default: 0.05, see ``KnowledgeConfig.init_keep``); eval gate sigmoid(l) > 0.5. The subnetwork is the mask m; the
  remaining model uses 1 - m (``fastmask.inverse``).
* Loss, on the remaining model: 1.5 KL(uniform || p) at the TargetKG tail tokens (suppression) + KL(p_full ||
  p_remaining) at the ControlKG tail tokens + the same KL at every position of WikiText-2 blocks + lambda(t) * mean
  sigmoid(l) (lambda = 2 for the first half of the steps, then linear to 3). Adam (lr 0.2 in the paper) with a
  linear warm-up over the first 10% of steps. One mask sample per step, shared by the three terms.
* Deviation from the released code (documented in every report): that code reads the KL terms at the tail token's
  own position, i.e. from the distribution that predicts the token AFTER the tail; fastmask reads the distribution
  that predicts each tail token, from the position before it (a causal LM's prediction of the tail, which is what
  the evaluation scores); ``objective_position="released"`` replays the released reading. The released code scores
  only the last tail token; ``tail_tokens="all"`` (default) scores every token of the tail word, ``"last"`` only the
  last one.
* Evaluation: perplexity of the tail tokens (TargetKG, held-out ControlKG) and of held-out WikiText-2 blocks under the
  full model, the remaining model and the remaining model of RANDOM subnetworks with the same number of weights per
  layer (``random_draws`` of them, default 5: their mean and range), and the paraphrase test (the TargetKG triplets'
  other templates, never trained on); gold-token rank and log-probability deltas; sparsity overall, per layer and
  attention vs MLP.

Speed: the blocks below the masked ones are frozen and unmasked, so their output on the fixed data sets is computed
once (and cached on disk, ``fastmask.experiments.blocks``); each step then runs only the top blocks (``TopBlocks``),
and the LM head only at the scored positions (all positions for LM text). On a GPU the masked layers run the fused
kernels of the active fastmask backend.

Modules: ``config`` (KnowledgeConfig), ``data`` and ``wordnet`` (knowledge graphs, sentences, LM text, tokenised
data), ``scoring`` (token ids, the template perplexities: prefix-shared packed forwards, cached by sentence),
``model`` (loading, loss terms), ``evaluate``, ``train`` (run_experiment, the command line), ``report``, ``study``
(``--targets`` x ``--seeds``: one whole run per cell, mean and 95% interval over them).
"""

from .config import EXPERIMENT, KnowledgeConfig
from .data import DataError
from .train import add_arguments, run_experiment, run_from_args

__all__ = ["EXPERIMENT", "KnowledgeConfig", "DataError", "add_arguments", "run_experiment", "run_from_args"]
