"""Sweep helpers for an experiment file's `get_sweep()`: lists of config overrides.

A sweep is a list of dicts, one per run, mapping dotted config keys to values, e.g.
[{"optim.learning_rate": 1e-3, "model.d_model": 32}, ...]. Build it with:

  axis("optim.learning_rate", [1e-3, 3e-3])        # one key, one run per value
  product(sweep_a, sweep_b, ...)                   # every combination (a grid)
  zip(sweep_a, sweep_b, ...)                       # element by element (equal lengths)
  random_search({"optim.learning_rate": log_uniform(1e-4, 1e-2),
                 "model.d_model": [32, 64]}, num_runs=8, seed=0)

so that, in experiments/NAME.py,

  def get_sweep():
    return sweeps.product(sweeps.axis("optim.learning_rate", [1e-3, 3e-3]),
                          sweeps.zip(sweeps.axis("model.d_model", [32, 64]),
                                     sweeps.axis("model.d_ff", [128, 256])))

gives four runs. `python -m launch.sweep --config=experiments/NAME.py ...` runs them.
"""

import builtins
import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np

from models.errors import InputError

Sweep = list[dict]


def axis(key: str, values: Sequence) -> Sweep:
  """One run per value of the config key `key`."""
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
    raise InputError(f"axis({key!r}, ...) needs a non-empty list of values, got {values!r}.")
  return [{key: value} for value in values]


def _merge(parts: Sequence[dict]) -> dict:
  merged = {}
  for part in parts:
    shared = sorted(set(merged) & set(part))
    if shared:
      raise InputError(f"Two sweeps set the same key(s) {shared}; each key may come from one "
                       "sweep only (zip them into one first).")
    merged.update(part)
  return merged


def product(*sweeps: Sweep) -> Sweep:
  """Every combination of one run from each sweep (the first sweep varies slowest)."""
  return [_merge(parts) for parts in itertools.product(*sweeps)]


def zip(*sweeps: Sweep) -> Sweep:  # pylint: disable=redefined-builtin
  """Runs merged element by element: run i takes run i of every sweep."""
  lengths = [len(sweep) for sweep in sweeps]
  if len(set(lengths)) > 1:
    raise InputError(f"zip needs sweeps of equal length, got lengths {lengths}.")
  return [_merge(parts) for parts in builtins.zip(*sweeps)]


@dataclasses.dataclass(frozen=True)
class Uniform:
  """A float drawn uniformly from [low, high), or log-uniformly (log=True)."""
  low: float
  high: float
  log: bool = False

  def sample(self, rng: np.random.Generator) -> float:
    if self.log:
      return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
    return rng.uniform(self.low, self.high)


def uniform(low: float, high: float) -> Uniform:
  if not low < high:
    raise InputError(f"uniform({low}, {high}) needs low < high.")
  return Uniform(low, high)


def log_uniform(low: float, high: float) -> Uniform:
  """Uniform in log space: as likely in [1e-4, 1e-3) as in [1e-3, 1e-2)."""
  if not 0 < low < high:
    raise InputError(f"log_uniform({low}, {high}) needs 0 < low < high.")
  return Uniform(low, high, log=True)


def random_search(space: dict, num_runs: int, seed: int, digits: int = 3) -> Sweep:
  """`num_runs` runs drawn from `space` ({key: list of choices | uniform | log_uniform}).

  The same seed gives the same runs. Drawn floats are rounded to `digits` significant
  digits, so that run names stay readable.
  """
  if num_runs < 1:
    raise InputError(f"random_search needs num_runs >= 1, got {num_runs}.")
  for key, dist in space.items():
    if not isinstance(dist, Uniform) and (isinstance(dist, str) or not isinstance(
        dist, Sequence) or not dist):
      raise InputError(f"random_search: {key!r} must be a non-empty list of choices, "
                       f"uniform(...) or log_uniform(...), got {dist!r}.")
  rng = np.random.default_rng(seed)

  def draw(dist):
    if isinstance(dist, Uniform):
      return float(f"{dist.sample(rng):.{digits}g}")
    return dist[int(rng.integers(len(dist)))]

  return [{key: draw(dist) for key, dist in space.items()} for _ in range(num_runs)]
