"""The numbers task against num2words, with seeded, disjoint splits."""

import numpy as np
from num2words import num2words
import pytest

from experiments import quickstart
from train.data import numbers
from train.data import sources

SMALL = dict(max_number=10_000, num_train=3_000, num_validation=200, num_test=200)


def _numbers(split, **options):
  source = numbers.numbers_source(split, **{**SMALL, **options})
  return [int(source[i]["inputs"]) for i in range(len(source))]


def _brazilian(n: int) -> str:
  """num2words' pt_BR without its commas: Brazilian writing has none between the groups."""
  return num2words(n, lang="pt_BR").replace(",", "")


@pytest.mark.parametrize("language, reference", [
    ("pt_BR", _brazilian), ("pt", lambda n: num2words(n, lang="pt"))])
def test_examples_are_num2words_of_their_inputs(language, reference):
  source = numbers.numbers_source("test", language=language, **SMALL)
  assert len(source) == SMALL["num_test"]
  for i in range(len(source)):
    example = source[i]
    assert set(example) == {"inputs", "targets"}
    assert example["targets"] == reference(int(example["inputs"]))
    assert example["inputs"] == str(int(example["inputs"]))


def test_brazilian_portuguese_is_the_default_and_reads_as_the_issue_says():
  default = numbers.numbers_source("validation", **SMALL)
  assert default.language == "pt_BR"
  hand_written = {
      2026: "dois mil e vinte e seis", 17: "dezessete", 2309: "dois mil trezentos e nove",
      19: "dezenove", 16: "dezesseis",
      123_456: "cento e vinte e três mil quatrocentos e cinquenta e seis",
      987_654_321: "novecentos e oitenta e sete milhões seiscentos e cinquenta e quatro mil "
                   "trezentos e vinte e um",
  }
  source = numbers.NumbersSource(np.array(list(hand_written)), language="pt_BR")
  assert [source[i]["targets"] for i in range(len(source))] == list(hand_written.values())


def test_european_portuguese_stays_available():
  european = {17: "dezassete", 19: "dezanove", 16: "dezasseis",
              2309: "dois mil trezentos e nove", 2026: "dois mil e vinte e seis"}
  source = numbers.NumbersSource(np.array(list(european)), language="pt")
  assert [source[i]["targets"] for i in range(len(source))] == list(european.values())


def test_other_languages_keep_num2words_commas():
  source = numbers.NumbersSource(np.array([1234]), language="en")
  assert source[0]["targets"] == num2words(1234, lang="en") == (
      "one thousand, two hundred and thirty-four")


def test_language_switch():
  pt_br = numbers.numbers_source("validation", **SMALL)
  en = numbers.numbers_source("validation", language="en", **SMALL)
  np.testing.assert_array_equal(pt_br.numbers, en.numbers)
  for i in range(20):
    n = int(en[i]["inputs"])
    assert en[i]["targets"] == num2words(n, lang="en")
    assert en[i]["targets"] != pt_br[i]["targets"]


def test_the_quickstart_writes_brazilian_portuguese():
  options = quickstart.get_config("tiny").data.source_options.to_dict()
  source = sources.get_source("numbers", "test", **options)
  targets = [source[i]["targets"] for i in range(len(source))]
  assert targets == [_brazilian(int(source[i]["inputs"])) for i in range(len(source))]
  assert not any("," in words for words in targets)


def test_same_seed_same_data_other_seed_other_data():
  for split in numbers.SPLITS:
    assert _numbers(split, seed=3) == _numbers(split, seed=3)
    assert _numbers(split, seed=3) != _numbers(split, seed=4)


def test_held_out_numbers_never_appear_in_training():
  splits = {split: set(_numbers(split, max_number=1_000, num_train=20_000,
                                num_validation=20, num_test=20))
            for split in numbers.SPLITS}
  assert not splits["train"] & splits["validation"]
  assert not splits["train"] & splits["test"]
  assert not splits["validation"] & splits["test"]
  assert all(0 <= n < 1_000 for s in splits.values() for n in s)
  assert len(splits["train"]) > 800  # 20k draws reach nearly every training number


def test_evaluation_numbers_are_distinct():
  for split in ("validation", "test"):
    drawn = _numbers(split)
    assert len(drawn) == len(set(drawn)) == SMALL[f"num_{split}"]


def test_training_data_ignores_evaluation_sizes_and_grows_by_prefix():
  train = _numbers("train")
  assert _numbers("train", num_test=50, num_validation=10) == train
  assert _numbers("train", num_train=1_000) == train[:1_000]


def test_magnitudes_are_log_uniform_up_to_a_billion():
  source = numbers.numbers_source("train", max_number=10**9, num_train=9_000)
  digits = np.array([len(str(n)) for n in source.numbers])
  assert source.numbers.max() < 10**9
  counts = np.bincount(digits, minlength=10)[1:]
  assert counts.min() > 0.7 * 1_000 and counts.max() < 1.3 * 1_000, counts


def test_numbers_through_get_source():
  source = sources.get_source("numbers", "test", language="en", **SMALL)
  reference = numbers.numbers_source("test", language="en", **SMALL)
  assert source[5] == reference[5]


@pytest.mark.parametrize("split, options, message", [
    ("dev", {}, "splits"),
    ("train", {"language": "klingon"}, "num2words has no language"),
    ("train", {"max_number": 10**9 + 1}, "max_number"),
    ("train", {"held_out_fraction": 0.0}, "held_out_fraction"),
    ("test", {"max_number": 1_000, "num_test": 1_000}, "too many"),
    ("train", {"num_train": -1}, "negative"),
])
def test_bad_options_are_clear_errors(split, options, message):
  with pytest.raises(ValueError, match=message):
    numbers.numbers_source(split, **options)
