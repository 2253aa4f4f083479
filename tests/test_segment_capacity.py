"""config.data.max_segments_per_row: validated, and promised by the train step to the attention.

The packing side (rows capped, nothing dropped) is in test_pipeline.py; cuDNN's packed path
within a capacity (no cond, equal to the float64 reference) in test_attention_kernels.py.
"""

import jax
import pytest

from experiments import gpt2_small
from models import attention, attention_kernels
from test_attention_kernels import conds, emulated_cudnn
from train import config as config_lib, inputs as inputs_lib, loop, parallel


def test_the_key_is_a_count_from_zero():
  c = gpt2_small.get_config("tiny")
  for value in (0, 1, 64):
    c.data.max_segments_per_row = value
    config_lib.validate(c)
  c.data.max_segments_per_row = -1
  with pytest.raises(ValueError, match=r"^config\.data\.max_segments_per_row must be >= 0, "
                     r"got -1\.$"):
    config_lib.validate(c)


def test_the_promise_is_what_the_train_batches_keep_to():
  c = gpt2_small.get_config("tiny")
  c.data.max_segments_per_row = 5
  assert inputs_lib.max_segments_per_row(c) == 5
  c.data.max_segments_per_row = 0
  assert inputs_lib.max_segments_per_row(c) is None  # packed as many as fit
  c.data.pack = False
  assert inputs_lib.max_segments_per_row(c) == 1  # one example a row
  c.task = "classify"
  assert inputs_lib.max_segments_per_row(c) is None  # no packing, no promise


@pytest.fixture
def cudnn_segments(monkeypatch):
  """cuDNN's packed attention emulated and chosen by None for packed causal attention on this
  CPU; the list of segments a row (M) it was called with."""
  seen = []
  def recording_cudnn(query, key, value, *, q_seqlen, **kwargs):
    seen.append(q_seqlen.shape[1])
    return emulated_cudnn(query, key, value, q_seqlen=q_seqlen, **kwargs)
  monkeypatch.setattr(attention, "_automatic_packed", lambda query: "cudnn_packed")
  monkeypatch.setattr(attention_kernels, "_cudnn_private_api",
                      lambda: (recording_cudnn, "PADDING_CAUSAL", 90800))
  return seen


def test_the_train_step_runs_cudnn_within_the_data_limit_without_cond(tmp_path, cudnn_segments):
  config = gpt2_small.get_config("tiny")
  config.data.max_segments_per_row = 5
  exp = loop.build(config, str(tmp_path))
  state, shardings = loop.init_state(exp, jax.random.key(0))
  batch = next(iter(exp.inputs.train_pipeline(config.train.batch_size)))
  assert 1 < max(len(set(row) - {0}) for row in batch["segment_ids"].tolist()) <= 5
  placed = parallel.host_to_global(batch, exp.mesh)

  assert conds(loop.jit_train_step(exp, shardings), state, placed) == 0
  assert set(cudnn_segments) == {5}
  config.data.max_segments_per_row = 0  # no limit: 16 a row, checked by a cond per call
  cudnn_segments.clear()
  assert conds(loop.jit_train_step(exp, shardings), state, placed) > 0
  assert set(cudnn_segments) == {attention_kernels.CUDNN_SEGMENTS_PER_ROW}
