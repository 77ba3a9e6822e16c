"""Probes of what each layer of a transformer encodes: structural probes (Hewitt & Manning 2019) and the
tree-topological probe (Li, Yin, Lin 2023), on frozen hidden states of any HF encoder, and linear (logistic
regression) probes of what any frozen representation carries.

    from fastmask import probing
    train = probing.read_conllu("en_ewt-ud-train.conllu", limit=1000)
    feats = probing.extract_features(model, tokenizer, [s.words for s in train])      # every layer, one pass
    batches = feats.layer_batches(6)
    result = probing.train_depth_probe("ssp", batches, val_batches, probing.ProbeSettings())
    labels = probing.tree_topological_labels(norms, mask)                             # vectorised pseudo-labels
    accuracy = probing.linear_probe_accuracy(train_x, train_y, test_x, test_y)        # a logistic-regression probe

``fastmask run topoprobe`` runs the whole study (per-layer X_sp / X_ssp / X_essp, structural metrics,
probe-regularised fine-tuning on CoLA, optionally on a masked subnetwork).
"""

from .classifiers import fit_linear_probe, linear_probe_accuracy
from .conllu import Sentence, iter_conllu, read_conllu, tree_depths, tree_distances, validate_heads
from .features import (FeatureBatch, LayerFeatures, encode_words, extract_features, pool_words, usable_sentences,
                       word_piece_targets)
from .metrics import (depth_spearman, distance_spearman, length_averaged, matthews_corrcoef, minimum_spanning_tree,
                      per_batch_mcc, root_accuracy, spearman, uuas)
from .probes import (DEPTH_KINDS, DepthProbe, DepthProbeResult, DistanceProbe, ProbeSettings, depth_baselines,
                     depth_diagnostics, depth_targets, distance_l1_loss, masked_mse, probe_regulariser_loss,
                     train_depth_probe, train_distance_probe)
from .pseudo_labels import reverse_in_position, tree_topological_labels, tree_topological_labels_reference

__all__ = ["Sentence", "iter_conllu", "read_conllu", "tree_depths", "tree_distances", "validate_heads",
           "FeatureBatch", "LayerFeatures", "encode_words", "extract_features", "pool_words", "usable_sentences",
           "word_piece_targets", "depth_spearman", "distance_spearman", "length_averaged", "matthews_corrcoef",
           "minimum_spanning_tree", "per_batch_mcc", "root_accuracy", "spearman", "uuas", "DEPTH_KINDS",
           "DepthProbe", "DepthProbeResult", "DistanceProbe", "ProbeSettings", "depth_baselines", "depth_diagnostics",
           "depth_targets",
           "distance_l1_loss", "masked_mse", "probe_regulariser_loss", "train_depth_probe", "train_distance_probe",
           "reverse_in_position", "tree_topological_labels", "tree_topological_labels_reference", "fit_linear_probe",
           "linear_probe_accuracy"]
