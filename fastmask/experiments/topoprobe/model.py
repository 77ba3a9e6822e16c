"""Model side of the topoprobe experiment: the frozen encoder whose layers are probed (optionally the subnetwork of
fastmask masks) and the probe-regularised fine-tuning of a CoLA classifier (the training loop; its dev-set evaluation
is in evaluate.py)."""

from __future__ import annotations

from typing import Optional

import torch

import fastmask as fm

from ...probing import DepthProbe, probe_regulariser_loss
from ...probing.features import FeatureBatch, LayerFeatures
from ..pretrained import import_transformers, load_pretrained, load_tokenizer
from ..runner import BatchStream, seed_everything
from .config import TopoprobeConfig
from .data import _encode_cola


# --- setup --------------------------------------------------------------------------------------------------
def load_encoder(source: str, masks: Optional[str], device):
    """(tokenizer, base encoder in eval mode). With ``masks``: the model class the masks were saved for is loaded,
    patched by fm.load_masks (saved MaskConfig, eval-mode gates) and its base encoder returned."""
    transformers = import_transformers(quiet=True)
    tokenizer = load_tokenizer(source, use_fast=True)
    if masks is None:
        return tokenizer, load_pretrained(source, "AutoModel", device, quiet=True)
    meta = fm.io.read_mask_metadata(masks)
    architecture = meta.get("fingerprint", {}).get("architecture")
    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None or not hasattr(model_class, "from_pretrained"):
        architecture = "AutoModel"
    model = load_pretrained(source, architecture, quiet=True)
    fm.load_masks(model, masks)
    return tokenizer, model.base_model.to(device).eval()


@torch.no_grad()
def extract_padded_features(model, tokenizer, sentences, *, layers, pad_to: int, batch_size: int,
                            dtype: torch.dtype, device, kept: list[int], dropped: list[int]) -> LayerFeatures:
    """The hidden states of ``layers`` as the released code computes them: every sentence of ``kept`` (corpus
    order) padded to ``pad_to`` pieces, its corpus' maximum ([CLS] and [SEP] included), so that [CLS], [SEP] and
    the padding positions of every sentence, not only the batch's longest, enter the "padding included" loss."""
    was_training = model.training
    model.eval()
    batches = []
    try:
        for start in range(0, len(kept), batch_size):
            index = kept[start:start + batch_size]
            encoding = tokenizer([list(sentences[i]) for i in index], is_split_into_words=True, padding="max_length",
                                 max_length=pad_to, truncation=False, return_tensors="pt")
            word_ids = torch.tensor([[-1 if w is None else w for w in encoding.word_ids(i)] for i in range(len(index))],
                                    dtype=torch.long)
            hidden_states = model(**{k: v.to(device) for k, v in encoding.items()}, output_hidden_states=True) \
                .hidden_states
            hidden = torch.stack([hidden_states[layer] for layer in layers]).to("cpu", dtype)
            batches.append(FeatureBatch(hidden, encoding["attention_mask"].cpu(), word_ids,
                                        torch.tensor(index, dtype=torch.long)))
    finally:
        model.train(was_training)
    return LayerFeatures(batches, list(layers), int(batches[0].hidden.shape[-1]), list(dropped))


# --- fine-tuning --------------------------------------------------------------------------------------------
def finetune_model(source: str, tokenizer, train_rows, layer: Optional[int], seed: int, probe_init,
                   config: TopoprobeConfig, device, pad_to: Optional[int] = None):
    """The training half of one fine-tuning run on CoLA (``layer`` None: plain fine-tuning): cross-entropy, plus
    ``config.probe_weight`` x the pseudo-label loss of a depth probe at ``layer`` (started from ``probe_init`` when
    given). ``pad_to``: pad every batch to that many pieces (the released protocol) instead of its longest.
    Returns (the classifier in eval mode, its training record: final losses, trainable parameters)."""
    from transformers import get_linear_schedule_with_warmup  # lazy: transformers takes seconds to import

    seed_everything(seed)
    model = load_pretrained(source, "AutoModelForSequenceClassification", device, quiet=True, num_labels=2)
    if config.freeze_word_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    # CoLA is 70% acceptable: with plain CE a short run predicts the majority class for everything (MCC 0)
    counts = torch.bincount(torch.tensor([r[1] for r in train_rows]), minlength=2).clamp(min=1).float()
    class_weight = (counts.sum() / (2 * counts)).to(device) if config.class_weighted else None
    probe = None
    if layer is not None:
        probe = DepthProbe(model.config.hidden_size, config.probe_rank).to(device)
        if probe_init is not None:
            with torch.no_grad():
                probe.proj.copy_(probe_init.to(device))
        params += list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.finetune_lr, eps=1e-8)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * config.steps), config.steps)
    stream = BatchStream(len(train_rows), config.batch_size, seed=seed)
    losses, probe_losses = [], []
    model.train()
    for _ in range(config.steps):
        rows = [train_rows[i] for i in stream.next()]
        encoding, word_ids = _encode_cola(tokenizer, [r[0] for r in rows], config.max_length, pad_to)
        labels = torch.tensor([r[1] for r in rows], device=device)
        out = model(**{k: v.to(device) for k, v in encoding.items()}, output_hidden_states=probe is not None)
        ce = torch.nn.functional.cross_entropy(out.logits.float(), labels, weight=class_weight)
        loss = ce
        if probe is not None:
            norms = probe(out.hidden_states[layer])
            regulariser = probe_regulariser_loss(norms, (word_ids >= 0).to(device), labels,
                                                 include_padding=config.include_padding)
            loss = loss + config.probe_weight * regulariser
            probe_losses.append(float(regulariser.detach()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(ce.detach()))
    model.eval()
    return model, {
        "final_ce": float(sum(losses[-10:]) / len(losses[-10:])), "trainable_parameters": trainable,
        "class_weighted": bool(config.class_weighted),
        "final_probe_loss": float(sum(probe_losses[-10:]) / len(probe_losses[-10:])) if probe_losses else None}
