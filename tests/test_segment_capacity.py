"""config.data.max_segments_per_row: validated, and promised by the train step to the attention.

The packing side (rows capped, nothing dropped) is in test_pipeline.py; cuDNN's packed path
within a capacity (no cond, equal to the float64 reference) in test_attention_kernels.py.
"""

import dataclasses
import re

import jax
import pytest

from experiments import gpt2_small
from models import attention_choice, attention_kernels
from test_attention_kernels import conds, emulated_cudnn
from train.engine import loop, parallel
from train.run import inputs as inputs_lib, validation


def test_the_key_is_a_count_from_zero():
  c = gpt2_small.get_config("tiny")
  for value in (0, 1, 64):
    c.data.max_segments_per_row = value
    validation.validate(c)
  c.data.max_segments_per_row = -1
  with pytest.raises(ValueError, match=r"^config\.data\.max_segments_per_row must be >= 0, "
                     r"got -1\.$"):
    validation.validate(c)


def test_the_promise_is_what_the_train_batches_keep_to():
  c = gpt2_small.get_config("tiny")
  c.data.max_segments_per_row = 5
  assert inputs_lib.max_segments_per_row(c.task, c.data) == 5
  c.data.max_segments_per_row = 0
  assert inputs_lib.max_segments_per_row(c.task, c.data) is None  # packed as many as fit
  c.data.pack = False
  assert inputs_lib.max_segments_per_row(c.task, c.data) == 1  # one example a row
  c.task = "classify"
  assert inputs_lib.max_segments_per_row(c.task, c.data) is None  # no packing, no promise


@pytest.fixture
def cudnn_segments(monkeypatch):
  """cuDNN's packed attention emulated and chosen by None for packed causal attention on this
  CPU; the list of segments a row (M) it was called with."""
  seen = []
  def recording_cudnn(query, key, value, *, q_seqlen, **kwargs):
    seen.append(q_seqlen.shape[1])
    return emulated_cudnn(query, key, value, q_seqlen=q_seqlen, **kwargs)
  monkeypatch.setattr(attention_choice, "_automatic_packed", lambda query: "cudnn_packed")
  monkeypatch.setattr(attention_kernels, "_cudnn_private_api",
                      lambda: (recording_cudnn, "PADDING_CAUSAL", 90800))
  return seen


def test_the_train_step_runs_cudnn_within_the_data_limit_without_cond(tmp_path, cudnn_segments):
  config = gpt2_small.get_config("tiny")
  config.data.max_segments_per_row = 5
  exp = loop.build(config, str(tmp_path))
  state, shardings = loop.init_state(exp, jax.random.key(0))
  batch = next(iter(exp.inputs.train_pipeline(config.train.batch_size)))
  most = max(len(set(row) - {0}) for row in batch["segment_ids"].tolist())
  assert 1 < most <= 4
  placed = parallel.host_to_global(batch, exp.mesh)

  assert conds(loop.jit_train_step(exp, shardings), state, placed) == 0
  assert set(cudnn_segments) == {5}  # by default the config's limit
  cudnn_segments.clear()
  # what the loop passes: the batch's
  capacity, _ = inputs_lib.BatchLayout(config.task, config.data)(batch)
  assert capacity == 4
  assert conds(loop.jit_train_step(exp, shardings, capacity), state, placed) == 0
  assert set(cudnn_segments) == {4}
  config.data.max_segments_per_row = 0  # no limit, no capacity: 16 a row, checked by a cond
  cudnn_segments.clear()
  assert conds(loop.jit_train_step(exp, shardings), state, placed) > 0
  assert set(cudnn_segments) == {attention_kernels.CUDNN_SEGMENTS_PER_ROW}


@pytest.fixture
def on_a_hopper_gpu(monkeypatch):
  """The attention chooses as on a Hopper GPU with cuDNN 9.8 while a step is traced, and jax's
  cuDNN attention lowers for CUDA on this CPU; `trace(fn, *args)` traces jitted fn so."""
  from jax._src.cudnn import fused_attention_stablehlo as fused
  monkeypatch.setattr(fused, "check_cudnn_version", lambda: 90800)
  monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(fused, "is_cuda_compute_capability_equal", lambda capability: False)
  monkeypatch.setattr(attention_choice, "_cuda_capability", lambda: (9, 0))

  def trace(fn, *args):
    with monkeypatch.context() as patch:
      patch.setattr(jax, "default_backend", lambda: "gpu")
      return fn.trace(*args)
  return trace


def cudnn_calls(lowered_text: str) -> list[tuple[str, str]]:
  """(mask type, softmax statistics type) of each cuDNN attention forward in the program."""
  forwards = [line for line in lowered_text.splitlines() if "custom_call @__cudnn$fmha" in line
              and "Backward" not in line]
  return [(re.search(r'mask_type\\22: \\22(\w+)', line).group(1),
           re.search(r'-> \(tensor<[^>]*>, (tensor<[^>]*>)', line).group(1)) for line in forwards]


@pytest.mark.parametrize("pack", [False, True], ids=["unpacked", "packed"])
def test_the_lowered_cuda_step_runs_the_attention_the_batch_needs(tmp_path, on_a_hopper_gpu,
                                                                  pack):
  """GPT-2's bf16 train step lowered for CUDA: rows of one example take cuDNN's causal kernel
  (softmax statistics [B, N, T]), packed ones its packed layout with the batch's capacity
  (statistics [B * capacity, N, T]), not the 64 of the config."""
  config = gpt2_small.get_config("tiny")
  config.data.pack, config.model.dtype = pack, "bfloat16"
  exp = loop.build(config, str(tmp_path))
  # One device: on several, jax's cuDNN attention lowers to a custom partitioning call.
  exp = dataclasses.replace(exp, mesh=parallel.make_mesh(devices=jax.devices()[:1]))
  state, shardings = loop.init_state(exp, jax.random.key(0))
  capacity, batch = inputs_lib.BatchLayout(config.task, config.data)(
      next(iter(exp.inputs.train_pipeline(config.train.batch_size))))
  step = loop.jit_train_step(exp, shardings, capacity)
  lowered = on_a_hopper_gpu(step, state, parallel.host_to_global(batch, exp.mesh)).lower(
      lowering_platforms=("cuda",))

  B, T, N = config.train.batch_size, config.data.seq_len, exp.model_cfg.num_heads
  expected = ("PADDING_CAUSAL", f"tensor<{B * capacity}x{N}x{T}xf32>") if pack else (
      "CAUSAL", f"tensor<{B}x{N}x{T}xf32>")
  assert capacity == (4 if pack else 1)
  assert cudnn_calls(lowered.as_text()) == [expected] * exp.model_cfg.num_layers
