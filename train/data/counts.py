"""What happened to each example on its way to a batch: the names of its counts.

Every example carries a "counts" vector (one int a name of `COUNTS`) from tokenization to the
batch, so the counts survive worker processes and iterator checkpoints. This module imports no
grain, so inference code that lays out tokens (train.generate) loads without it.
"""

import numpy as np

COUNTS = ("examples", "empty", "invalid_utf8", "truncated", "split",
          "dropped_long", "truncated_tokens")
DROPPED = np.array([name in ("empty", "dropped_long") for name in COUNTS])


def new_counts() -> np.ndarray:
  """The counts of one example just read."""
  counts = np.zeros(len(COUNTS), np.int64)
  counts[COUNTS.index("examples")] = 1
  return counts
