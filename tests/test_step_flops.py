"""The train step's FLOPs (metrics.step_flops), against textbook hand counts: the whole global
step, whatever the 8 CPU devices of the tests each run of it; model FLOPs whatever is
rematerialised, fused attention kernels counted as the XLA path's products."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from experiments import gpt2_small, transformer_base
from models import attention_kernels
from train.engine import loop, metrics, parallel

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


def lm_batch(length: int) -> dict:
  seg = segments(length)
  return {"inputs": tokens(length, 0), "targets": tokens(length, 1), "segment_ids": seg["ids"],
          "positions": seg["positions"], "weights": np.ones((ROWS, length), np.float32)}


def six_n_plus_attention(length: int) -> float:
  """Kaplan et al. / PaLM appendix B: 6 FLOPs per weight per token (forward + backward), the
  tied output table a matmul once; attention scores and values 12·L·D·T per token."""
  weights = LAYERS * (4 * D * D + 2 * D * FF) + VOCAB * D
  return (6 * weights + 12 * LAYERS * D * length) * ROWS * length


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
  exp, state, step, batch = compiled_step(config, tmp_path, lm_batch(length))
  flops = metrics.step_flops(step.trace(state, batch))
  assert flops == pytest.approx(six_n_plus_attention(length), rel=0.05)

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


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
  """One workdir for the module's experiments: the local dataset is prepared once."""
  return tmp_path_factory.mktemp("flops")


def traced_lm_step(folder, length: int, **model):
  config = widened(gpt2_small.get_config("tiny"), seq_len=length)
  config.model.update(model)
  exp = loop.build(config, str(folder))
  state, shardings = loop.init_state(exp, jax.random.key(0))
  step = loop.jit_train_step(exp, shardings)
  return step.trace(state, parallel.host_to_global(lm_batch(length), exp.mesh))


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("remat_policy", ["none", "full", "dots", "dots_no_batch"])
def test_rematerialised_work_is_not_model_flops(data_folder, remat_policy, scan_layers):
  length = 128
  traced = traced_lm_step(data_folder, length, remat_policy=remat_policy,
                          scan_layers=scan_layers)
  assert metrics.step_flops(traced) == six_n_plus_attention(length)
  # Hardware FLOPs add the forward the backward recomputes. "full" recomputes a layer's
  # products but the last (the feed-forward's output, which its backward does not read): Q,
  # K, V and the attention output (4·D²), the feed-forward's input (D·FF), scores and values
  # (2 products of T·D a token).
  recomputed = {"none": 0, "dots": 0,
                "full": LAYERS * ROWS * length * (2 * (4 * D * D + D * FF) + 4 * length * D),
                # Saves the products without batch dimensions: recomputes scores and values.
                "dots_no_batch": LAYERS * ROWS * length * 4 * length * D}[remat_policy]
  assert metrics.step_flops(traced, hardware=True) == six_n_plus_attention(length) + recomputed


@pytest.mark.slow
def test_a_step_on_pallas_attention_counts_as_one_on_xla(data_folder, monkeypatch):
  """The whole step, Pallas run per shard of the 8 devices (interpreted, as
  test_attention_kernels reaches it on a CPU): the same model FLOPs as the XLA path's."""
  from models import attention_choice
  monkeypatch.setattr(attention_choice, "_packed_problem", lambda *args: None)
  monkeypatch.setattr(attention_kernels, "pallas_packed_causal", functools.partial(
      attention_kernels.pallas_packed_causal, interpret=True))
  traced = traced_lm_step(data_folder, 128, attention_implementation="pallas")
  assert "mha_forward" in str(traced.jaxpr)
  assert metrics.step_flops(traced) == six_n_plus_attention(128)


def attention_step_flops(attend, q_BTNH, *, hardware=False):
  """FLOPs of attention's forward and backward (the gradient of every operand)."""
  loss = lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()
  traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q_BTNH, q_BTNH, q_BTNH)
  return metrics.step_flops(traced, hardware=hardware)


B, T, N, H = 2, 128, 4, 32
# The XLA path's products, causal or not (the baseline's 12·L·d·T a token): Q Kᵀ and P V
# forward, their two operands' gradients backward.
FULL_ATTENTION = 3 * 2 * (2 * B * N * T * T * H)


@pytest.mark.parametrize("is_causal", [False, True])
def test_xla_attention_counts_every_query_key_pair(is_causal):
  q = jnp.ones((B, T, N, H), jnp.float32)
  attend = functools.partial(jax.nn.dot_product_attention, is_causal=is_causal,
                             implementation="xla")
  assert attention_step_flops(attend, q) == FULL_ATTENTION


@pytest.mark.slow
def test_pallas_attention_counts_its_work_not_one_grid_cell():
  q = jnp.ones((B, T, N, H), jnp.bfloat16)
  ids = np.ones((B, T), np.int32)
  attend = lambda q, k, v: attention_kernels.pallas_packed_causal(
      q, k, v, ids, scale=0.1, interpret=True)
  assert attention_step_flops(attend, q) == FULL_ATTENTION
  assert attention_step_flops(attend, q, hardware=True) == FULL_ATTENTION


@pytest.mark.parametrize("layout", ["BTNH", "BNTH"])
def test_cudnn_attention_counts_its_work_from_the_shapes(monkeypatch, layout):
  """cuDNN's fused attention is an opaque custom call: traced here (never run) with jax's
  version probe answering as a GPU host's would."""
  fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
  monkeypatch.setattr(fused, "check_cudnn_version", lambda: 90800)
  q = jnp.ones((B, T, N, H) if layout == "BTNH" else (B, N, T, H), jnp.bfloat16)
  attend = lambda q, k, v: fused.dot_product_attention(
      q, k, v, scale=0.1, mask_type=fused.MaskType.CAUSAL, qkv_layout=layout)
  assert attention_step_flops(attend, q) == FULL_ATTENTION


@pytest.mark.slow
def test_splash_attention_counts_its_three_kernels_as_the_xla_products():
  q = jnp.ones((B, 256, N, H), jnp.bfloat16)  # Splash takes multiples of 128 tokens.
  ids = np.ones((B, 256), np.int32)
  attend = lambda q, k, v: attention_kernels.splash_packed_causal(
      q, k, v, ids, scale=0.1, interpret=True)
  # Beside the kernels, splash's backward sums O·dO over H by an einsum (0.2% here).
  assert attention_step_flops(attend, q) == pytest.approx(FULL_ATTENTION * 4, rel=0.005)
