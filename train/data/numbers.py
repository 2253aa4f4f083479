"""The quickstart task, a number in words: {"inputs": "2026", "targets": "dois mil e vinte e seis"}.

Targets are what `num2words(n, lang=language)` prints. The default is Brazilian Portuguese
("pt_BR": 17 -> "dezessete"), written without the commas num2words puts between its groups
("dois mil trezentos e nove", not "dois mil, trezentos e nove"); "pt" is European Portuguese
(17 -> "dezassete"), and every other language is used as num2words prints it.

Sampling: each example draws a number of digits uniformly from 1..D (D: the digits of
`max_number - 1`), then a number uniformly among those with that many digits (0 counts as a
one-digit number), so "7" is as likely a magnitude as "123456".

Held-out numbers: a seeded hash gives every number below `max_number` a value u in [0, 1);
u < held_out_fraction / 2 puts it in validation, u < held_out_fraction in test, the rest
in train. Each split only draws its own numbers, so no validation or test number ever
appears in training. Train draws with replacement (small numbers recur as often as their
share of the distribution asks); validation and test hold distinct numbers. Every split has
its own random stream, so the training data does not change with the evaluation sizes, and
a smaller split is a prefix of a bigger one with the same seed.
"""

import num2words as num2words_lib
import numpy as np

from models.errors import InputError

SPLITS = ("train", "validation", "test")
MAX_NUMBER_LIMIT = 10**9
_CHUNK = 4096
# Languages whose written numbers have no commas where num2words prints them.
_WITHOUT_COMMAS = frozenset({"pt_BR"})


class NumbersSource:
  """Random access to numbers and their words: `len(source)`, `source[i] -> dict`."""

  def __init__(self, numbers: np.ndarray, language: str):
    self.numbers = numbers
    self.language = language

  def __len__(self) -> int:
    return len(self.numbers)

  def __getitem__(self, index: int) -> dict[str, str]:
    number = int(self.numbers[index])
    words = num2words_lib.num2words(number, lang=self.language)
    if self.language in _WITHOUT_COMMAS:
      words = words.replace(",", "")
    return {"inputs": str(number), "targets": words}

  def __repr__(self) -> str:
    return f"NumbersSource({len(self)} numbers, language={self.language!r})"


def numbers_source(
    split: str,
    *,
    language: str = "pt_BR",
    max_number: int = 10**6,
    seed: int = 0,
    num_train: int = 100_000,
    num_validation: int = 1_000,
    num_test: int = 1_000,
    held_out_fraction: float = 0.1,
) -> NumbersSource:
  """The `split` of the numbers task: numbers in [0, max_number) and their words."""
  if split not in SPLITS:
    raise InputError(f"Numbers task has splits {SPLITS}, not {split!r}.")
  _check_language(language)
  if not 10 <= max_number <= MAX_NUMBER_LIMIT:
    raise InputError(
        f"max_number={max_number} must be between 10 and {MAX_NUMBER_LIMIT:_}.")
  if not 0 < held_out_fraction <= 0.5:
    raise InputError(
        f"held_out_fraction={held_out_fraction} must be in (0, 0.5].")
  if not 0 <= seed < 2**32:
    raise InputError(f"seed={seed} must be in [0, 2**32).")
  size = {"train": num_train, "validation": num_validation, "test": num_test}[split]
  if size < 0:
    raise InputError(f"num_{split}={size} must not be negative.")
  if split != "train" and size > held_out_fraction / 4 * max_number:
    raise InputError(
        f"num_{split}={size} distinct held-out numbers are too many: about "
        f"{held_out_fraction / 2 * max_number:.0f} numbers below {max_number} are held out "
        f"for {split}, and at most half of them can be asked for. Lower num_{split}, or "
        "raise max_number or held_out_fraction.")
  numbers = _draw(split, size, max_number, seed, held_out_fraction)
  return NumbersSource(numbers, language)


def split_of(numbers: np.ndarray, seed: int, held_out_fraction: float) -> np.ndarray:
  """The split index (0 train, 1 validation, 2 test) each number belongs to."""
  u = _unit_hash(np.asarray(numbers, np.uint64), seed)
  return np.where(
      u < held_out_fraction / 2, 1, np.where(u < held_out_fraction, 2, 0))


def _draw(split, size, max_number, seed, held_out_fraction) -> np.ndarray:
  """`size` numbers of `split`, drawn chunk by chunk from the split's own stream."""
  split_index = SPLITS.index(split)
  rng = np.random.default_rng([seed, split_index])
  accepted = np.zeros((0,), np.int64)
  while len(accepted) < size:
    candidates = _sample_magnitudes(rng, _CHUNK, max_number)
    mine = candidates[split_of(candidates, seed, held_out_fraction) == split_index]
    accepted = np.concatenate([accepted, mine])
    if split != "train":
      _, first = np.unique(accepted, return_index=True)
      accepted = accepted[np.sort(first)]
  return accepted[:size]


def _sample_magnitudes(rng, count, max_number) -> np.ndarray:
  """Numbers below max_number whose digit count is uniform over the possible ones."""
  max_digits = len(str(max_number - 1))
  digits = rng.integers(1, max_digits + 1, size=count)
  low = np.where(digits == 1, 0, 10 ** (digits - 1))
  return rng.integers(low, np.minimum(10**digits, max_number))


def _unit_hash(numbers: np.ndarray, seed: int) -> np.ndarray:
  """A value in [0, 1) for each number below 2**32, fixed by the seed (splitmix64)."""
  z = numbers + np.uint64(seed << 32) + np.uint64(0x9E3779B97F4A7C15)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  z = z ^ (z >> np.uint64(31))
  return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


def _check_language(language: str) -> None:
  if language not in num2words_lib.CONVERTER_CLASSES:
    raise InputError(
        f"num2words has no language {language!r}; choose one of "
        f"{sorted(num2words_lib.CONVERTER_CLASSES)}.")
