"""Sources by name under tfds.testing.mock_data, compared with tfds' own data sources.

`mock_data(policy=MockPolicy.USE_CODE)` patches `DatasetBuilder.as_data_source` with random
examples built from the dataset's features; it needs no TensorFlow (only the `as_dataset` path
does) and no metadata files. The mock yields text as str and labels as numpy scalars, real
array_record data yields bytes and ints; the sources turn both into str and int.
"""

import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tensorflow_datasets.text  # noqa: F401  (registers glue, as sources does on first use)
import tensorflow_datasets.translate  # noqa: F401  (registers the *_translate datasets)

from train.data import sources

NUM_EXAMPLES = 4


@pytest.fixture
def mock_tfds():
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def _raw(name, split="train"):
  return tfds.data_source(name, split=split, download=False)


def _check_texts(example, fields):
  assert set(example) == set(fields)
  for field in fields:
    if field != "label":
      assert isinstance(example[field], str) and example[field]


def test_wmt14_is_seq2seq_in_both_directions(mock_tfds):
  del mock_tfds
  raw = _raw("wmt14_translate/de-en")
  de_en = sources.get_source("wmt14_translate/de-en", "train")
  en_de = sources.get_source("wmt14_translate/de-en", "validation", source_language="en")
  assert len(de_en) == NUM_EXAMPLES
  for i in range(NUM_EXAMPLES):
    _check_texts(de_en[i], ("inputs", "targets"))
    assert de_en[i] == {"inputs": raw[i]["de"], "targets": raw[i]["en"]}
    assert en_de[i] == {"inputs": raw[i]["en"], "targets": raw[i]["de"]}
  with pytest.raises(ValueError, match="neither"):
    sources.get_source("wmt14_translate/de-en", "train", source_language="fr")


def test_other_translate_configs_follow_tfds_supervised_keys(mock_tfds):
  del mock_tfds
  source = sources.get_source("wmt19_translate/zh-en", "train")
  assert source[0] == {"inputs": _raw("wmt19_translate/zh-en")[0]["zh"],
                       "targets": _raw("wmt19_translate/zh-en")[0]["en"]}


def test_lm1b_is_text(mock_tfds):
  del mock_tfds
  source = sources.get_source("lm1b", "test")
  raw = _raw("lm1b", "test")
  for i in range(NUM_EXAMPLES):
    _check_texts(source[i], ("text",))
    assert source[i]["text"] == raw[i]["text"]


@pytest.mark.parametrize("name, text, text_pair", [
    ("glue/sst2", "sentence", None),
    ("glue/mnli", "premise", "hypothesis"),
    ("glue/qqp", "question1", "question2"),
    ("imdb_reviews", "text", None),
])
def test_classification_sources(mock_tfds, name, text, text_pair):
  del mock_tfds
  source = sources.get_source(name, "train")
  raw = _raw(name)
  num_classes = tfds.builder(name).info.features["label"].num_classes
  fields = ("text", "label") + (("text_pair",) if text_pair else ())
  for i in range(NUM_EXAMPLES):
    example = source[i]
    _check_texts(example, fields)
    assert type(example["label"]) is int and 0 <= example["label"] < num_classes
    assert example["label"] == int(raw[i]["label"])
    assert example["text"] == raw[i][text]
    if text_pair:
      assert example["text_pair"] == raw[i][text_pair]


def test_sources_pickle_for_grain_workers(mock_tfds):
  del mock_tfds
  source = sources.get_source("glue/sst2", "train")
  copy = pickle.loads(pickle.dumps(source))
  assert [copy[i] for i in range(len(copy))] == [source[i] for i in range(len(source))]


def test_bytes_decode_and_invalid_utf8_is_replaced_and_counted():
  base = [{"en": "ação".encode(), "label": np.int64(2)},
          {"en": b"bad \xff byte", "label": np.array(0)}]
  source = sources.Source(base, {"text": "en", "label": "label"}, "fake")
  assert source[0] == {"text": "ação", "label": 2}
  assert type(source[0]["label"]) is int
  assert source.num_invalid_utf8 == 0
  assert source[1]["text"] == b"bad \xff byte".decode("utf-8", errors="replace")
  assert source.num_invalid_utf8 == 1


def test_unprepared_datasets_say_how_to_prepare_them(tmp_path):
  for name in ("lm1b", "glue/sst2", "wmt14_translate/de-en"):
    with pytest.raises(FileNotFoundError,
                       match=f"python -m train.data.sources {name} --data_dir={tmp_path}"):
      sources.get_source(name, "train", data_dir=str(tmp_path))


def test_unknown_names_and_options_are_clear_errors(mock_tfds):
  del mock_tfds
  with pytest.raises(ValueError, match="no canonical fields"):
    sources.get_source("mnist", "train")
  with pytest.raises(ValueError, match=r"Unknown options for lm1b: \['source_language'\]"):
    sources.get_source("lm1b", "train", source_language="en")
  with pytest.raises(ValueError, match="needs task="):
    sources.get_source("local:/tmp/x.tsv", "train")
