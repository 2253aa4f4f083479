"""From tokenized examples to rows: split over-long ones, drop flagged ones, pack.

Examples flagged by their counts (`train/data/examples.py`: empty, dropped as too long) are
removed here, and the counts of the rest travel on into the batch.
"""

from typing import Any

import grain
import numpy as np

from train.data.examples import DROPPED


class SplitLong(grain.experimental.FlatMapTransform):
  """Cuts every sequence feature into pieces of at most `length` tokens."""

  max_fan_out = 2**31 - 1  # Unused by FlatMapIterDataset; required by the ABC.

  def __init__(self, length: int):
    self.length = length

  def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    size = max(len(v) for k, v in element.items() if k != "counts")
    if size <= self.length:
      return [element]
    no_counts = np.zeros_like(element["counts"])
    return [{k: (v[start:start + self.length] if k != "counts"
                 else v if start == 0 else no_counts)
             for k, v in element.items()}
            for start in range(0, size, self.length)]


class DropFlagged(grain.IterDataset):
  """Drops examples counted as empty or dropped; the next row carries their counts.

  If the stream ends on dropped examples, the last of them is kept (as a row
  with no tokens or zero weight) so that their counts still reach the batch.
  """

  def __iter__(self) -> grain.DatasetIterator:
    return _DropFlaggedIterator(self._parent.__iter__())


class _DropFlaggedIterator(grain.DatasetIterator):

  def __next__(self) -> dict[str, np.ndarray]:
    carried, element = None, None
    while True:
      try:
        element = next(self._parent)
      except StopIteration:
        if carried is None:
          raise
        return {**element, "counts": carried}
      if not np.any(element["counts"][DROPPED]):
        break
      carried = element["counts"] if carried is None else carried + element["counts"]
    if carried is not None:
      element = {**element, "counts": element["counts"] + carried}
    return element

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()  # Nothing is carried between calls.

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


def pack(ds: grain.IterDataset, lengths: dict[str, int], rename: dict[str, str], *,
         weights_from: str, pad_id: int | dict[str, int], batch_size: int,
         num_packing_bins: int | None, pack: bool,
         max_segments_per_row: int = 0) -> grain.IterDataset:
  """Rows of `lengths` (grain first-fit packing, one example a row if not `pack`).

  grain adds `<feature>_segment_ids` (1, 2, ... per example, 0 on padding) and
  `<feature>_positions` (0, 1, ... per example); `rename` picks the row's keys. A packed row
  holds at most `max_segments_per_row` examples (0 = as many as fit); an example that would
  be one too many starts another row, so none is dropped.
  """
  if not isinstance(pad_id, dict):
    pad_id = {k: pad_id for k in lengths}
  max_segments = (max_segments_per_row or None) if pack else 1
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct=lengths,
      num_packing_bins=(num_packing_bins or batch_size) if pack else batch_size,
      shuffle_bins=False, meta_features=("counts",), padding_struct=pad_id,
      max_sequences_per_bin=max_segments)
  return ds.map(_FinishRow(rename, weights_from, max_segments))


def check_segments(segment_ids_T: np.ndarray, max_segments: int) -> None:
  """A RuntimeError unless the row's non-zero ids form at most `max_segments` runs, each id
  one run (what the attention is promised: models.attention_kernels.segments_at_most)."""
  previous_T = np.concatenate([[0], segment_ids_T[:-1]])
  run_ids = segment_ids_T[(segment_ids_T != 0) & (segment_ids_T != previous_T)]
  if len(run_ids) > max_segments or np.any(np.diff(run_ids) <= 0):
    raise RuntimeError(f"A packed row has segment ids {run_ids.tolist()} (one a run): more "
                       f"than {max_segments} runs, or an id that is not above the one before; "
                       "grain's packing should not write that, so check the grain version.")


class _FinishRow:
  """Renames a packed row's features, adds weights, sums its examples' counts; checks that
  its segment ids keep to `max_segments` (None: no limit, nothing to check)."""

  def __init__(self, rename: dict[str, str], weights_from: str, max_segments: int | None):
    self.rename, self.weights_from = rename, weights_from
    self.max_segments = max_segments

  def __call__(self, row: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {new: row[old] for new, old in self.rename.items()}
    if self.max_segments is not None:
      for key in out:
        if key.endswith("segment_ids"):
          check_segments(out[key], self.max_segments)
    out["weights"] = (row[self.weights_from] > 0).astype(np.float32)
    out["counts"] = np.sum(row["counts"], axis=0, dtype=np.int64)
    return out
