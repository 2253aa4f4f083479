"""The train step's FLOPs (metrics.step_flops), against textbook hand counts: the whole global
step, whatever the 8 CPU devices of the tests each run of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from experiments import gpt2_small, transformer_base
from train import loop, metrics, parallel

D, HEADS, FF, LAYERS, VOCAB, ROWS = 256, 4, 1024, 2, 512, 8


def widened(config, **data):
  """An experiment's tiny variant at width 256, so that matmuls dominate as in real models."""
  c = config
  c.model.d_model, c.model.num_heads, c.model.d_ff, c.model.num_layers = D, HEADS, FF, LAYERS
  c.model.vocab_size, c.model.dropout_rate, c.train.batch_size = VOCAB, 0.0, ROWS
  c.data.update(data)
  return c


def segments(length: int) -> dict:
  """Two examples in each row: ids 1 then 2, positions restarting at the boundary."""
  ids = np.where(np.arange(length) < length // 3, 1, 2)
  positions = np.concatenate([np.arange(length // 3), np.arange(length - length // 3)])
  return {"ids": np.tile(ids, (ROWS, 1)).astype(np.int32),
          "positions": np.tile(positions, (ROWS, 1)).astype(np.int32)}


def tokens(length: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(3, VOCAB, (ROWS, length), dtype=np.int32)


def compiled_step(config, tmp_path, batch):
  exp = loop.build(config, str(tmp_path))
  state, shardings = loop.init_state(exp, jax.random.key(0))
  step = loop.jit_train_step(exp, shardings)
  batch = parallel.host_to_global(batch, exp.mesh)
  return exp, state, step, batch


@pytest.mark.slow
def test_lm_step_flops_match_six_n_plus_attention(tmp_path):
  length = 128
  config = widened(gpt2_small.get_config("tiny"), seq_len=length)
  config.train.peak_flops = 1e12
  seg = segments(length)
  batch = {"inputs": tokens(length, 0), "targets": tokens(length, 1), "segment_ids": seg["ids"],
           "positions": seg["positions"], "weights": np.ones((ROWS, length), np.float32)}
  exp, state, step, batch = compiled_step(config, tmp_path, batch)
  flops = metrics.step_flops(step.trace(state, batch))

  # Kaplan et al. / PaLM appendix B: 6 FLOPs per weight per token (forward + backward), the
  # tied output table a matmul once; attention scores and values 12·L·D·T per token.
  weights = LAYERS * (4 * D * D + 2 * D * FF) + VOCAB * D
  per_token = 6 * weights + 12 * LAYERS * D * length
  assert flops == pytest.approx(per_token * ROWS * length, rel=0.05)

  throughput = loop.Throughput(exp)
  throughput.count_flops_once(step, state, batch)
  throughput.lap({"tokens": 1.0}, 1)  # The first interval: compilation, no MFU.
  out = throughput.lap({"tokens": 1.0}, 3)
  assert out["mfu"] == pytest.approx(
      flops / out["step_seconds"] / (1e12 * jax.device_count()), rel=1e-6)


@pytest.mark.slow
def test_seq2seq_step_flops_count_each_side_on_its_own_tokens(tmp_path):
  source, target = 64, 64
  config = widened(transformer_base.get_config("tiny"), inputs_len=source, targets_len=target)
  enc, dec = segments(source), segments(target)
  batch = {"encoder_tokens": tokens(source, 0), "encoder_segment_ids": enc["ids"],
           "encoder_positions": enc["positions"], "decoder_inputs": tokens(target, 1),
           "decoder_targets": tokens(target, 2), "decoder_segment_ids": dec["ids"],
           "decoder_positions": dec["positions"],
           "weights": np.ones((ROWS, target), np.float32)}
  exp, state, step, batch = compiled_step(config, tmp_path, batch)
  flops = metrics.step_flops(step.trace(state, batch))

  # The encoder's weights see source tokens; the decoder's see target tokens, except the
  # cross-attention's keys and values, which project the encoder's output (source tokens).
  # Attention: encoder self S x S, decoder self T x T and cross T x S.
  block = 4 * D * D + 2 * D * FF
  weight_tokens = (LAYERS * block * source + LAYERS * (block + 2 * D * D) * target
                   + LAYERS * 2 * D * D * source + VOCAB * D * target)
  attention = 12 * LAYERS * D * (source * source + target * target + target * source)
  correct = ROWS * (6 * weight_tokens + attention)
  assert flops == pytest.approx(correct, rel=0.10)

  # The hand formula MFU used before: every weight against source + target tokens.
  all_weights = LAYERS * block + LAYERS * (block + 2 * D * D) + VOCAB * D
  length = source + target
  before = ROWS * length * (6 * all_weights + 12 * 2 * LAYERS * D * length)
  assert 0.4 < flops / before < 0.6


def test_flops_count_batched_products_loops_branches_and_shards():
  """2 x multiply-adds, by hand: scans multiply their body, a cond counts one branch (the
  larger), a shard_map's per-shard body counts once a shard."""
  a, b = np.ones((4, 8), np.float32), np.ones((8, 16), np.float32)
  product = 2 * 4 * 8 * 16
  count = lambda f, *args: metrics.step_flops(jax.jit(f).trace(*args))
  assert count(lambda a, b: a @ b, a, b) == product
  batched = np.ones((3, 4, 8), np.float32), np.ones((3, 8, 16), np.float32)
  assert count(lambda x, y: jnp.einsum("bij,bjk->bik", x, y), *batched) == 3 * product
  scan = lambda a, b: jax.lax.scan(lambda c, _: (c + (a @ b).sum(), None), 0.0, length=5)[0]
  assert count(scan, a, b) == 5 * product
  cond = lambda p, a, b: jax.lax.cond(p, lambda: (a @ b @ b.T).sum(), lambda: (a @ b).sum())
  assert count(cond, True, a, b) == product + 2 * 4 * 16 * 8
  assert count(lambda a: a + 1, a) is None

  mesh = Mesh(np.array(jax.devices()), ("d",))
  sharded = jax.shard_map(lambda x, y: x @ y, mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d"))
  rows = 8 * jax.device_count()
  assert count(sharded, np.ones((rows, 8), np.float32), b) == 2 * rows * 8 * 16
