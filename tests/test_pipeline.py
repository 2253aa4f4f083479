"""grain pipelines: packing, order, resumption, host shards, counts, batch formats.

Expected rows are rebuilt here from the raw UTF-8 bytes of the texts (the byte
tokenizer's ids are bytes + 4), independently of the pipeline's code.
"""

import collections
import json

import numpy as np
import pytest
from num2words import num2words
import tokenizers
from tokenizers import implementations

from train.data import packing, pipeline, tokenizers as toks

BYTES = toks.ByteTokenizer()
BOS, EOS = BYTES.bos_id, BYTES.eos_id


def texts(n=60, seed=0):
  rng = np.random.default_rng(seed)
  words = ["gato", "sentou", "no", "tapete", "ação", "pão", "rato", "rei"]
  return [" ".join(rng.choice(words, rng.integers(1, 9))) for _ in range(n)]


def byte_ids(text):
  return [b + 4 for b in text.encode("utf-8")]


def lm_source(n=60):
  return [{"text": t} for t in texts(n)]


def lm(source, **kwargs):
  kwargs = {"batch_size": 4, "seq_len": 24, "process_index": 0,
            "process_count": 1, **kwargs}
  return pipeline.lm_pipeline(source, BYTES, **kwargs)


def segments(batch, keys, segment_key):
  """(row, features) of every segment, checking it is contiguous from position 0."""
  found = []
  for row in range(batch[segment_key].shape[0]):
    ids = batch[segment_key][row]
    real = np.flatnonzero(ids)
    assert np.all(real == np.arange(len(real))), "padding only at the end"
    for segment in range(1, ids.max(initial=0) + 1):
      where = np.flatnonzero(ids == segment)
      assert len(where) and np.all(np.diff(where) == 1)
      found.append((row, tuple(tuple(batch[k][row, where].tolist()) for k in keys)))
  return found


def expected_lm_pieces(source, seq_len):
  pieces = []
  for example in source:
    ids = byte_ids(example["text"])
    if not example["text"].strip():
      continue
    inputs, targets = [BOS] + ids, ids + [EOS]
    for start in range(0, len(inputs), seq_len):
      pieces.append((tuple(inputs[start:start + seq_len]),
                     tuple(targets[start:start + seq_len])))
  return collections.Counter(pieces)


def batches(iterator, n=None):
  return [b for _, b in zip(range(n), iterator)] if n else list(iterator)


@pytest.mark.parametrize("pack", [True, False])
def test_lm_rows_hold_every_piece_once_with_right_ids(pack):
  source = lm_source() + [{"text": "tapete " * 9}]  # 63 bytes: three pieces.
  out = batches(iter(lm(source, pack=pack, num_epochs=1)))
  found = collections.Counter()
  for batch in out:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((4, 24), np.dtype(d)) for k, d in [
            ("inputs", "int32"), ("targets", "int32"), ("segment_ids", "int32"),
            ("positions", "int32"), ("weights", "float32")]}
    np.testing.assert_array_equal(batch["weights"], batch["segment_ids"] > 0)
    for row, (inputs, targets, positions) in segments(
        batch, ["inputs", "targets", "positions"], "segment_ids"):
      assert positions == tuple(range(len(inputs)))
      assert inputs[1:] == targets[:-1]  # Targets are the next tokens.
      found[(inputs, targets)] += 1
    padding = batch["segment_ids"] == 0
    assert np.all(batch["inputs"][padding] == BYTES.pad_id)
    assert np.all(batch["positions"][padding] == 0)
    if not pack:
      assert batch["segment_ids"].max() <= 1
  assert found == expected_lm_pieces(source, 24)
  if pack:  # Packing fills rows: fewer rows than pieces.
    assert len(out) * 4 < sum(found.values())


def test_max_segments_per_row_caps_rows_and_drops_nothing():
  source = lm_source()
  limited, free = ([segments(b, ["inputs", "targets"], "segment_ids")
                    for b in iter(lm(source, seq_len=64, num_epochs=1, **limit))]
                   for limit in ({"max_segments_per_row": 2}, {}))
  per_row = lambda out: collections.Counter((i, row) for i, found in enumerate(out)
                                            for row, _ in found).values()
  assert max(per_row(limited)) == 2 < max(per_row(free))
  pieces = collections.Counter(piece for found in limited for _, piece in found)
  assert pieces == expected_lm_pieces(source, 64)
  with pytest.raises(ValueError, match="max_segments_per_row=-1 must be 0"):
    lm(source, max_segments_per_row=-1)


def test_a_row_breaking_the_segment_promise_is_refused():
  packing.check_segments(np.array([1, 1, 2, 3, 3, 0, 0]), 3)
  for ids in ([1, 1, 2, 3, 4, 0], [1, 2, 1, 0, 0, 0], [2, 1, 1, 0, 0, 0]):
    with pytest.raises(RuntimeError, match="A packed row has segment ids"):
      packing.check_segments(np.array(ids), 3)


def test_seq2seq_pairs_stay_together():
  rng = np.random.default_rng(1)
  source = [{"inputs": str(n), "targets": num2words(n, lang="pt")}
            for n in rng.integers(0, 1000, 40)]
  out = batches(iter(pipeline.seq2seq_pipeline(
      source, BYTES, batch_size=3, inputs_len=12, targets_len=40, num_epochs=1,
      process_index=0, process_count=1)))
  found = collections.Counter()
  for batch in out:
    assert batch["encoder_tokens"].shape == (3, 12)
    assert batch["decoder_targets"].shape == (3, 40)
    np.testing.assert_array_equal(batch["weights"], batch["decoder_segment_ids"] > 0)
    enc = segments(batch, ["encoder_tokens", "encoder_positions"], "encoder_segment_ids")
    dec = segments(batch, ["decoder_inputs", "decoder_targets", "decoder_positions"],
                   "decoder_segment_ids")
    assert [row for row, _ in enc] == [row for row, _ in dec]
    for (_, (tokens, enc_pos)), (_, (dec_in, dec_tgt, dec_pos)) in zip(enc, dec):
      assert enc_pos == tuple(range(len(tokens)))
      assert dec_pos == tuple(range(len(dec_in)))
      assert dec_in == (BOS,) + dec_tgt[:-1]  # Shifted right.
      found[(tokens, dec_tgt)] += 1
  expected = collections.Counter(
      (tuple(byte_ids(e["inputs"]) + [EOS]), tuple(byte_ids(e["targets"]) + [EOS]))
      for e in source)
  assert found == expected


def test_seq2seq_with_two_tokenizers_decodes_back_to_the_pairs(tmp_path):
  numbers = list(range(0, 3000, 7))
  source = [{"inputs": str(n), "targets": num2words(n, lang="pt")} for n in numbers]
  digits = toks.make_tokenizer("char", path=str(tmp_path / "digits.json"),
                               texts=lambda: (e["inputs"] for e in source))
  words = toks.make_tokenizer("word", path=str(tmp_path / "words.json"),
                              texts=lambda: (e["targets"] for e in source))
  found = set()
  for batch in pipeline.seq2seq_pipeline(
      source, digits, words, batch_size=8, inputs_len=16, targets_len=16,
      num_epochs=1, process_index=0, process_count=1):
    for row in range(8):
      for segment in range(1, batch["encoder_segment_ids"][row].max(initial=0) + 1):
        encoder = batch["encoder_tokens"][row][
            batch["encoder_segment_ids"][row] == segment]
        decoder = batch["decoder_inputs"][row][
            batch["decoder_segment_ids"][row] == segment]
        assert decoder[0] == words.bos_id
        found.add((digits.decode(encoder), words.decode(decoder)))
  assert found == {(e["inputs"], e["targets"]) for e in source}


def first_tokens(iterator, n):
  """The first byte of each row's text (rows hold one unsplit example)."""
  return [tuple(b["inputs"][:, 1].tolist()) for b in batches(iterator, n)]


def test_seed_fixes_the_order_and_epochs_differ():
  source = lm_source(40)
  rows = lambda **kw: iter(lm(source, pack=False, seq_len=80, **kw))
  one_a, one_b = first_tokens(rows(seed=1), 20), first_tokens(rows(seed=1), 20)
  two = first_tokens(rows(seed=2), 20)
  assert one_a == one_b and one_a != two
  unshuffled = first_tokens(rows(shuffle=False), 10)
  assert [t for b in unshuffled for t in b] == [
      byte_ids(e["text"])[0] for e in source]
  epoch1, epoch2 = one_a[:10], one_a[10:]  # 40 examples, 4 a batch.
  assert sorted(sum(epoch1, ())) == sorted(sum(epoch2, ())) and epoch1 != epoch2


@pytest.mark.parametrize("make", ["lm_split", "seq2seq", "mlm"])
def test_restored_state_gives_the_same_next_batches(make):
  source = lm_source(50) + [{"text": "rato " * 12}, {"text": ""}]
  if make == "lm_split":
    build = lambda: lm(source, seq_len=16)
  elif make == "seq2seq":
    source = [{"inputs": e["text"], "targets": e["text"][::-1]} for e in source]
    build = lambda: pipeline.seq2seq_pipeline(
        source, BYTES, batch_size=2, inputs_len=30, targets_len=30,
        process_index=0, process_count=1)
  else:
    build = lambda: pipeline.mlm_pipeline(source, BYTES, batch_size=4, seq_len=24,
                                          process_index=0, process_count=1)
  original = iter(build())
  batches(original, 7)
  state = json.loads(json.dumps(original.get_state()))
  expected = batches(original, 20)
  restored = iter(build())
  restored.set_state(state)
  for want, got in zip(expected, batches(restored, 20), strict=True):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  assert restored.counts == original.counts


def test_process_shards_are_disjoint_and_cover_the_split():
  source = [{"text": f"exemplo {i}"} for i in range(23)]
  seen = []
  for index in range(3):
    out = batches(iter(lm(source, pack=False, num_epochs=1, process_index=index,
                          process_count=3)))
    seen.append({inputs for _, (inputs,) in
                 (s for b in out for s in segments(b, ["inputs"], "segment_ids"))})
  assert all(not (seen[i] & seen[j]) for i in range(3) for j in range(i + 1, 3))
  assert set().union(*seen) == {tuple([BOS] + byte_ids(e["text"])) for e in source}


def test_truncation_and_empty_examples_are_counted():
  lengths = [3, 30, 0, 10, 45, 0]
  source = [{"text": "a" * n} for n in lengths] + [{"text": " \n"}]
  source.append({"text": b"caf\xe9"})  # Latin-1, not UTF-8.
  it = iter(lm(source, seq_len=16, overlong="truncate", num_epochs=1))
  out = batches(it)
  kept = sum(len(segments(b, ["inputs"], "segment_ids")) for b in out)
  assert kept == 5  # Three blank examples dropped...
  assert it.counts == {  # ...and counted, as everything else.
      "examples": 8, "empty": 3, "invalid_utf8": 1, "truncated": 2, "split": 0,
      "dropped_long": 0, "truncated_tokens": (31 - 16) + (46 - 16)}
  replaced = len("caf\ufffd".encode("utf-8"))
  assert sum(b["weights"].sum() for b in out) == 4 + 16 + 11 + 16 + replaced + 1

  pairs = [{"inputs": "a" * 20, "targets": "b"}, {"inputs": "a", "targets": ""},
           {"inputs": "a", "targets": "b"}]
  it = iter(pipeline.seq2seq_pipeline(
      pairs, BYTES, batch_size=2, inputs_len=8, targets_len=8, overlong="drop",
      num_epochs=1, process_index=0, process_count=1))
  assert len(segments(next(it), ["decoder_targets"], "decoder_segment_ids")) == 1
  assert it.counts["dropped_long"] == 1 and it.counts["empty"] == 1


def test_dropped_examples_at_the_end_still_counted():
  source = [{"text": "gato"}, {"text": ""}, {"text": ""}]
  it = iter(lm(source, shuffle=False, num_epochs=1))
  out = batches(it)
  assert it.counts["examples"] == 3 and it.counts["empty"] == 2
  assert sum(b["weights"].sum() for b in out) == 5


def bert_vocab(tmp_path):
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "o", "gato", "sent", "##ou",
           "no", "ta", "##pe", "##te", "a", "##ção", ",", "rato", "rei", "roma"]
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(vocab) + "\n")
  return str(path)


def test_classification_matches_the_library_bert_encoding(tmp_path):
  vocab = bert_vocab(tmp_path)
  source = [{"text": "o gato sentou no tapete", "label": 1},
            {"text": "o rato", "text_pair": "o rei sentou no tapete , ação", "label": 0},
            {"text": "tapete tapete tapete tapete", "text_pair": "o", "label": 2}]
  seq_len = 10
  out = next(iter(pipeline.classification_pipeline(
      source, toks.make_tokenizer("pretrained", path=vocab), batch_size=4,
      seq_len=seq_len, shuffle=False, num_epochs=1, process_index=0,
      process_count=1)))
  reference = implementations.BertWordPieceTokenizer(vocab, lowercase=True)
  reference.enable_truncation(seq_len, strategy="longest_first")
  reference.enable_padding(length=seq_len)
  for i, example in enumerate(source):
    want = reference.encode(example["text"], example.get("text_pair"))
    np.testing.assert_array_equal(out["tokens"][i], want.ids)
    np.testing.assert_array_equal(out["token_types"][i], want.type_ids)
    np.testing.assert_array_equal(out["padding_mask"][i], want.attention_mask)
  np.testing.assert_array_equal(out["label"], [1, 0, 2, 0])
  np.testing.assert_array_equal(out["weights"], [1, 1, 1, 0])  # Padded final batch.
  assert out["tokens"].dtype == np.int32 and out["padding_mask"].dtype == bool


def test_mlm_masks_like_bert():
  source = [{"text": t * 3} for t in texts(200)]
  seq_len = 64
  it = iter(pipeline.mlm_pipeline(source, BYTES, batch_size=50, seq_len=seq_len,
                                  num_epochs=1, process_index=0, process_count=1))
  out = batches(it)
  tokens = np.concatenate([b["tokens"] for b in out])
  targets = np.concatenate([b["targets"] for b in out])
  chosen = np.concatenate([b["weights"] for b in out]) > 0
  real = np.concatenate([b["padding_mask"] for b in out])
  np.testing.assert_array_equal(tokens[~chosen], targets[~chosen])
  assert not chosen[:, 0].any() and not (chosen & ~real).any()
  inner = real.sum() - 2 * len(real)  # BOS and EOS are never masked.
  assert abs(chosen.sum() / inner - 0.15) < 0.01
  masked = np.mean(tokens[chosen] == BYTES.mask_id)
  kept = np.mean(tokens[chosen] == targets[chosen])
  assert abs(masked - 0.8) < 0.04 and abs(kept - 0.1) < 0.04
  assert it.counts["truncated"] == sum(len(byte_ids(e["text"])) > 62 for e in source)


def test_bad_input_gives_clear_errors():
  with pytest.raises(ValueError, match="has no examples"):
    lm([])
  with pytest.raises(ValueError, match="overlong='wrap'"):
    lm(lm_source(), overlong="wrap")
  with pytest.raises(ValueError, match="process_index=3"):
    lm(lm_source(), process_index=3, process_count=2)
  with pytest.raises(ValueError, match="process 4 of 5 gets no examples"):
    lm(lm_source(4), process_index=4, process_count=5)
  with pytest.raises(ValueError, match="reads 'text'"):
    next(iter(lm([{"sentence": "gato"}])))
  classify = lambda source, **kw: next(iter(pipeline.classification_pipeline(
      source, BYTES, batch_size=1, seq_len=8, process_index=0, process_count=1,
      **kw)))
  with pytest.raises(ValueError, match="no 'label' field"):
    classify([{"text": "gato"}])
  with pytest.raises(ValueError, match="label_dtype='float32'"):
    classify([{"text": "gato", "label": 3.8}])
  assert classify([{"text": "gato", "label": 3.8}], label_dtype="float32")[
      "label"].dtype == np.float32
  word_level = lambda *vocab: toks.HFTokenizer(tokenizers.Tokenizer(
      tokenizers.models.WordLevel({w: i for i, w in enumerate(vocab)}, "<unk>")))
  with pytest.raises(ValueError, match="no end-of-sequence token"):
    pipeline.lm_pipeline(lm_source(), word_level("<unk>", "gato"), batch_size=2,
                         seq_len=8)
  no_mask = word_level("<unk>", "</s>", "gato")
  with pytest.raises(ValueError, match="mask token"):
    pipeline.mlm_pipeline(lm_source(), no_mask, batch_size=2, seq_len=8)


@pytest.mark.slow
def test_worker_processes_give_the_same_data_and_resume():
  source = lm_source(40)
  build = lambda: lm(source, pack=False, num_epochs=1, num_workers=2)
  it = iter(build())
  first = batches(it, 3)
  state = it.get_state()
  rest = batches(it)
  it.close()
  found = collections.Counter(
      s for b in first + rest for _, s in segments(b, ["inputs", "targets"], "segment_ids"))
  assert found == expected_lm_pieces(source, 24)
  restored = iter(build())
  restored.set_state(json.loads(json.dumps(state)))
  again = batches(restored)
  restored.close()
  assert len(again) == len(rest)
  for want, got in zip(rest, again):
    np.testing.assert_array_equal(want["inputs"], got["inputs"])


def test_packed_rows_give_each_example_its_own_loss_in_a_decoder():
  import jax
  import optax
  from models.config import TransformerConfig
  from models.transformer import DecoderOnly

  cfg = TransformerConfig(vocab_size=BYTES.vocab_size, d_model=32, num_heads=2,
                          d_ff=64, num_layers=2, max_len=24, position="learned")
  model = DecoderOnly(cfg)
  source = [{"text": t} for t in ["gato", "pato", "rato", "mato", "tato", "fato"]]
  batch = next(iter(lm(source, batch_size=2, shuffle=False, num_epochs=1)))
  assert batch["segment_ids"].max() >= 3  # Several examples share a row.
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["inputs"])

  @jax.jit
  def token_losses(inputs, targets, **kwargs):
    logits = model.apply(params, inputs, **kwargs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)

  packed = token_losses(batch["inputs"], batch["targets"],
                        segment_ids=batch["segment_ids"], positions=batch["positions"])
  checked = 0
  for row, segment_ids in enumerate(batch["segment_ids"]):
    for segment in range(1, segment_ids.max() + 1):
      where = segment_ids == segment
      alone = token_losses(batch["inputs"][row:row + 1, where],
                           batch["targets"][row:row + 1, where])
      np.testing.assert_allclose(packed[row, where], alone[0], rtol=1e-5, atol=1e-6)
      checked += 1
  assert checked == len(source)  # Same lengths alone: one compilation.
