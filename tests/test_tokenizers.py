"""Tokenizers: round trips, special ids, training cached and reused, bad files."""

import os
import pickle

import pytest
import tokenizers
from num2words import num2words
from tokenizers import implementations

from train.data import tokenizers as toks

TEXTS = ["ação", "gato sentou no tapete", "o rato roeu a roupa do rei de Roma",
         "coração, pão e limão", "vinte e três mil e quarenta"]


def corpus():
  words = [num2words(n, lang="pt") for n in range(400)]
  return TEXTS * 20 + words


def test_bytes_match_utf8_and_round_trip():
  tok = toks.ByteTokenizer()
  for text in TEXTS + ["日本語 ✓"]:
    ids = tok.encode(text)
    assert [i - 4 for i in ids] == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, 77, tok.pad_id]) == text
  assert tok.vocab_size == 260
  assert len({tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id}) == 4


def test_sentencepiece_trained_once_then_reused(tmp_path):
  path = str(tmp_path / "spm" / "vocab_64.model")
  tok = toks.SentencePieceTokenizer.train_or_load(path, corpus, vocab_size=64)
  assert os.path.exists(path) and tok.vocab_size == 64
  for text in TEXTS:
    assert tok.decode([tok.bos_id] + tok.encode(text) + [tok.eos_id]) == text
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
  assert tok.mask_id == 4
  mtime = os.path.getmtime(path)

  def must_not_train():
    raise AssertionError("the cached model should have been loaded")

  again = toks.SentencePieceTokenizer.train_or_load(path, must_not_train, 64)
  assert os.path.getmtime(path) == mtime
  assert all(again.encode(t) == tok.encode(t) for t in TEXTS)
  with pytest.raises(toks.TokenizerError, match="delete it to retrain"):
    toks.SentencePieceTokenizer.train_or_load(path, must_not_train, 128)
  with pytest.raises(toks.TokenizerError, match="Vocabulary size too high"):
    toks.SentencePieceTokenizer.train_or_load(
        str(tmp_path / "big.model"), corpus, vocab_size=5000)
  unpickled = pickle.loads(pickle.dumps(tok))
  assert unpickled.encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_word_level_round_trip_and_reuse(tmp_path):
  path = str(tmp_path / "words.json")
  tok = toks.make_tokenizer("word", path=path, texts=corpus)
  for text in TEXTS[:2] + ["trezentos e quarenta e dois"]:
    ids = tok.encode(text)
    assert len(ids) == len(text.split()) and tok.unk_id not in ids
    assert tok.decode(ids + [tok.eos_id] + ids) == text
  assert tok.encode("desconhecida") == [tok.unk_id]
  reloaded = toks.make_tokenizer("word", path=path, texts=lambda: 1 / 0)
  assert reloaded.encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_char_level_digits(tmp_path):
  tok = toks.make_tokenizer(
      "char", path=str(tmp_path / "digits.json"),
      texts=lambda: [str(n) for n in range(100)])
  assert tok.vocab_size == 5 + 10  # Specials, then the ten digits.
  ids = tok.encode("2024")
  assert len(ids) == 4 and ids[1] == tok.encode("0")[0]
  assert tok.decode(ids) == "2024"


def test_wordpiece_vocab_matches_library_bert_tokenizer(tmp_path):
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "o", "gato", "sent",
           "##ou", "no", "ta", "##pe", "##te", "a", "##ção", ","]
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(vocab) + "\n")
  tok = toks.make_tokenizer("pretrained", path=str(tmp_path))
  reference = implementations.BertWordPieceTokenizer(str(path), lowercase=True)
  for text in ["O gato sentou no tapete", "ação, gato", "xyz"]:
    expected = reference.encode(text).ids  # [CLS] ... [SEP]
    assert [tok.bos_id] + tok.encode(text) + [tok.eos_id] == expected
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (
      0, 1, 2, 3, 4)
  assert tok.decode(reference.encode("o gato sentou no tapete").ids) == (
      "o gato sentou no tapete")


def test_tokenizer_json_gpt2_style(tmp_path):
  bpe = implementations.ByteLevelBPETokenizer()
  bpe.train_from_iterator(corpus(), vocab_size=300,
                          special_tokens=["<|endoftext|>"])
  path = str(tmp_path / "tokenizer.json")
  bpe.save(path)
  tok = toks.HFTokenizer.from_file(path)
  reference = tokenizers.Tokenizer.from_file(path)
  assert tok.bos_id == tok.eos_id == tok.pad_id == 0 and tok.mask_id is None
  for text in TEXTS:
    ids = tok.encode(text)
    assert ids == reference.encode(text).ids
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, 5, 6]) == text


def test_missing_and_corrupt_files_give_one_clear_error(tmp_path):
  with pytest.raises(toks.TokenizerError, match="cannot read"):
    toks.make_tokenizer("pretrained", path=str(tmp_path / "nope.json"))
  with pytest.raises(toks.TokenizerError, match="neither tokenizer.json"):
    toks.make_tokenizer("pretrained", path=str(tmp_path))
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{not json")
  with pytest.raises(toks.TokenizerError, match="not a valid tokenizer file"):
    toks.make_tokenizer("pretrained", path=str(bad))
  bad_model = tmp_path / "spm.model"
  bad_model.write_bytes(b"\x00garbage")
  with pytest.raises(toks.TokenizerError, match="not a SentencePiece model"):
    toks.make_tokenizer("sentencepiece", path=str(bad_model),
                        texts=corpus, vocab_size=64)
  with pytest.raises(ValueError, match="use one of"):
    toks.make_tokenizer("bpe")
  bert = tmp_path / "bert"
  bert.mkdir()
  (bert / "vocab.txt").write_text("[UNK]\n")
  (bert / "tokenizer_config.json").write_text("[1, 2]")
  with pytest.raises(toks.TokenizerError, match="tokenizer_config.json is not a JSON object"):
    toks.make_tokenizer("pretrained", path=str(bert / "vocab.txt"))


@pytest.mark.parametrize("point_at", ["folder", "vocab.txt"])
def test_cased_wordpiece_vocab_matches_transformers(tmp_path, monkeypatch, point_at):
  """A vocab.txt-only BERT folder keeps its tokenizer_config.json's casing on every path."""
  transformers = pytest.importorskip("transformers")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "O", "o", "Gato", "gato",
           "sent", "##ou", "no", "Ta", "ta", "##pe", "##te", "ROMA", "roma", ","]
  (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
  (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": false}')
  path = str(tmp_path if point_at == "folder" else tmp_path / "vocab.txt")
  tok = toks.make_tokenizer("pretrained", path=path)
  references = (transformers.BertTokenizer.from_pretrained(str(tmp_path)),
                transformers.BertTokenizerFast.from_pretrained(str(tmp_path)))
  for text in ["O gato sentou no Tapete, ROMA", "Gato, gato, o GATO"]:
    for reference in references:
      assert tok.encode(text) == reference(text, add_special_tokens=False)["input_ids"]
  assert tok.encode("Gato") != tok.encode("gato")
