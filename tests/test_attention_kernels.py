"""Fused kernels for packed causal self-attention against the float64 numpy attention.

Pallas and splash run in Pallas interpret mode on this CPU; cuDNN's packed layout is checked
through its arguments (against a hand-worked example, numpy, and a numpy attention that reads
only those arguments) and its wrapper with an emulated kernel. GPU tests run it for real.
"""

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention, attention_choice, attention_kernels
from models.attention import dot_product_attention
from test_attention import numpy_attention, random_qkv

ON_GPU = jax.default_backend() == "gpu"
# For the tests that run the Pallas GPU kernel: jax 0.12 removed it.
NEEDS_PALLAS_MHA = pytest.mark.skipif(attention_kernels._pallas_mha() is None,
                                      reason=attention_kernels._NO_PALLAS_MHA)
# Compiled once per shape (run eagerly, each of its ops would compile on its own).
packed_segments = jax.jit(attention_kernels.packed_segments, static_argnums=1)


def packed_ids(rng, B, T, max_segments=4):
  """[B, T] ids of rows packed with 1..max_segments segments (ids 1, 2, ...), then padding 0."""
  rows = []
  for _ in range(B):
    lengths = rng.integers(1, T // max_segments + 1, rng.integers(1, max_segments + 1))
    row = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    rows.append(np.pad(row[:T], (0, T - min(len(row), T))))
  return np.stack(rows).astype(np.int32)


def packed_causal_mask(ids_BT):
  """[B, 1, T, T]: same non-zero segment and not in the future (the reference's rule)."""
  same = (ids_BT[:, None, :, None] == ids_BT[:, None, None, :]) & (ids_BT[:, None, :, None] > 0)
  return same & np.tril(np.ones((ids_BT.shape[1],) * 2, bool))


def expected_and_grads(q, k, v, ids, scale):
  """numpy float64 output, and jax.nn's gradients of sum(out * weights) for the same mask."""
  mask = packed_causal_mask(ids)
  expected, _ = numpy_attention(q, k, v, mask=mask, scale=scale)
  loss = lambda q, k, v: jnp.sum(loss_weights(q.shape) * jax.nn.dot_product_attention(
      q, jnp.repeat(k, q.shape[2] // k.shape[2], 2), jnp.repeat(v, q.shape[2] // k.shape[2], 2),
      mask=mask, scale=scale))
  return expected, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def loss_weights(shape):
  """Fixed, distinct weights per output element, so every gradient entry is exercised."""
  return jnp.asarray(np.random.default_rng(99).normal(size=shape), jnp.float32)


def check_kernel(kernel, q, k, v, ids, scale, atol=1e-5):
  """kernel (query, key, value, ids, scale=) matches numpy forward and jax.nn's gradients."""
  expected, expected_grads = expected_and_grads(q, k, v, ids, scale)
  run = lambda q, k, v: kernel(q, k, v, ids, scale=scale)
  out = jax.jit(run)(q, k, v)
  np.testing.assert_allclose(out, expected, atol=atol, rtol=atol)
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(loss_weights(q.shape) * run(q, k, v)),
                           argnums=(0, 1, 2)))(q, k, v)
  for grad, want in zip(grads, expected_grads):
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, want, atol=10 * atol, rtol=10 * atol)


# --------------------------------------------------------------------------------------
# cuDNN's packed layout: its arguments, and its wrapper around an emulated kernel.


def test_packed_segments_hand_worked_example():
  ids = np.array([[1, 1, 2, 2, 2, 0], [7, 7, 7, 7, 7, 7], [0, 0, 0, 0, 0, 0],
                  [1, 0, 0, 2, 3, 3]])
  seqlens, offsets, fits = packed_segments(ids, 3)
  np.testing.assert_array_equal(seqlens, [[2, 3, -1], [6, -1, -1], [-1, -1, -1], [1, 1, 2]])
  np.testing.assert_array_equal(offsets, [[0, 2, -1, -1], [0, -1, -1, -1], [-1, -1, -1, -1],
                                          [0, 3, 4, -1]])
  assert seqlens.dtype == offsets.dtype == jnp.int32 and bool(fits)


@pytest.mark.parametrize("ids, why", [([[1, 2, 3, 4, 0, 0]], "four segments"),
                                      ([[1, 1, 2, 1, 0, 0]], "id 1 comes back"),
                                      ([[1, 1, 0, 1, 0, 0]], "id 1 comes back after padding")])
def test_packed_segments_flag_what_the_layout_cannot_express(ids, why):
  assert not bool(packed_segments(np.array(ids), 3)[2]), why


def test_packed_segments_match_numpy_runs():
  rng = np.random.default_rng(0)
  ids = packed_ids(rng, 16, 40, max_segments=6)
  seqlens, offsets, fits = packed_segments(ids, 6)
  assert bool(fits)
  for b, row in enumerate(ids):
    starts = [t for t in range(len(row)) if row[t] and (t == 0 or row[t] != row[t - 1])]
    lengths = [int(np.sum(row == row[t])) for t in starts]
    pad = 6 - len(starts)
    np.testing.assert_array_equal(seqlens[b], lengths + [-1] * pad)
    np.testing.assert_array_equal(offsets[b], starts + [-1] * (pad + 1))


def numpy_packed_attention(q, k, v, seqlens, offsets, scale):
  """Causal attention within each (offset, seqlen) sequence of a row, as cuDNN documents it."""
  out = np.full(q.shape, np.nan)
  for b, m in zip(*np.nonzero(np.asarray(seqlens) > 0)):
    s = slice(offsets[b, m], offsets[b, m] + seqlens[b, m])
    causal = np.tril(np.ones((seqlens[b, m],) * 2, bool))
    out[b, s] = numpy_attention(q[b:b + 1, s], k[b:b + 1, s], v[b:b + 1, s], causal, None,
                                scale)[0][0]
  return out


def test_packed_arguments_describe_the_segment_mask():
  B, T, N, K, H = 3, 24, 2, 2, 8
  ids = packed_ids(np.random.default_rng(1), B, T)
  q, k, v = (np.asarray(x) for x in random_qkv(1, B, T, T, N, K, H))
  seqlens, offsets, _ = (np.asarray(x) for x in packed_segments(ids, 4))
  expected, _ = numpy_attention(q, k, v, mask=packed_causal_mask(ids), scale=0.3)
  ours = numpy_packed_attention(q, k, v, seqlens, offsets, 0.3)
  valid = ids > 0
  np.testing.assert_allclose(ours[valid], expected[valid], atol=1e-12)
  assert np.all(np.isnan(ours[~valid]))  # cuDNN's sequences leave padding out


def _sequence_of_token(seqlen_BM, offsets_BM1, T):
  """[B, T]: the sequence m holding token t, -1 outside every sequence."""
  t = jnp.arange(T)
  start_BM1 = offsets_BM1[:, :-1, None]
  in_BMT = (seqlen_BM[:, :, None] > 0) & (t >= start_BM1) & (t < start_BM1 + seqlen_BM[:, :, None])
  return jnp.where(in_BMT.any(1), jnp.argmax(in_BMT, axis=1), -1)


@jax.custom_vjp
def _garbage_gradient_outside(x, covered_BT):
  return x


_garbage_gradient_outside.defvjp(
    lambda x, covered: (x, covered),
    lambda covered, g: (jnp.where(covered[:, :, None, None], g, jnp.nan), None))


def emulated_cudnn(query, key, value, *, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale,
                   mask_type, qkv_layout):
  """cuDNN's packed layout as jax documents it, with NaN (output and gradients) off-sequence."""
  assert qkv_layout == "BTNH" and mask_type == "PADDING_CAUSAL"
  assert key.shape[2] == query.shape[2], "jax strides packed keys by the query's heads"
  T = query.shape[1]
  q_seq, kv_seq = _sequence_of_token(q_seqlen, q_offsets, T), _sequence_of_token(
      kv_seqlen, kv_offsets, T)
  query = _garbage_gradient_outside(query, q_seq >= 0)
  key, value = (_garbage_gradient_outside(x, kv_seq >= 0) for x in (key, value))
  mask = ((q_seq[:, None, :, None] == kv_seq[:, None, None, :]) & (q_seq >= 0)[:, None, :, None]
          & (jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]))
  out = jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale)
  return jnp.where((q_seq >= 0)[:, :, None, None], out, jnp.nan)


@pytest.fixture
def fake_cudnn(monkeypatch):
  """cuDNN's packed attention emulated (in jnp) behind the wrapper's private-API probe."""
  monkeypatch.setattr(attention_kernels, "_cudnn_private_api",
                      lambda: (emulated_cudnn, "PADDING_CAUSAL", 90800))


def xla_fallback(ids, scale):
  return functools.partial(jax.nn.dot_product_attention, mask=packed_causal_mask(ids),
                           scale=scale, is_causal=True, implementation="xla")


@pytest.mark.parametrize("many_segments", [False, True], ids=["fits", "falls_back"])
def test_cudnn_packed_wrapper_matches_reference(fake_cudnn, many_segments):
  B, T, N, K, H = 2, 32, 4, 2, 8
  rng = np.random.default_rng(2)
  ids = packed_ids(rng, B, T, max_segments=4)
  if many_segments:  # 20 one-or-two-token segments: more than CUDNN_SEGMENTS_PER_ROW
    ids[1] = np.pad(np.repeat(np.arange(1, 21), [1, 2] * 10)[:30], (0, 2))
    assert len(set(ids[1]) - {0}) > attention_kernels.CUDNN_SEGMENTS_PER_ROW
  q, k, v = random_qkv(3, B, T, T, N, K, H)
  kernel = lambda q, k, v, ids, scale: attention_kernels.cudnn_packed_causal(
      q, k, v, ids, scale=scale, fallback=xla_fallback(ids, scale))
  check_kernel(kernel, q, k, v, ids, scale=0.3)


def conds(fn, *args):
  """How many conditionals jax traces fn(*args) to (nested jaxprs included)."""
  return len(re.findall(r"\bcond\[", str(jax.make_jaxpr(fn)(*args))))


def cudnn_within(capacity):
  """cudnn_packed_causal traced within segments_at_most(capacity) (None: without it)."""
  def kernel(q, k, v, ids, scale):
    with (contextlib.nullcontext() if capacity is None
          else attention_kernels.segments_at_most(capacity)):
      return attention_kernels.cudnn_packed_causal(q, k, v, ids, scale=scale,
                                                   fallback=xla_fallback(ids, scale))
  return kernel


@pytest.mark.parametrize("many_segments", [False, True], ids=["few", "many"])
def test_cudnn_packed_within_a_capacity_runs_no_cond(fake_cudnn, many_segments):
  """Promised as many segments a row as the ids have at most, it equals the reference with no
  conditional in the program (many: 20, more than CUDNN_SEGMENTS_PER_ROW, all in the kernel)."""
  B, T, N, K, H = 2, 32, 4, 2, 8
  ids = packed_ids(np.random.default_rng(8), B, T, max_segments=4)
  if many_segments:
    ids[1] = np.pad(np.repeat(np.arange(1, 21), [1, 2] * 10), (0, 2))
  capacity = max(len(set(row) - {0}) for row in ids.tolist())
  assert capacity == (20 if many_segments else 3)
  q, k, v = random_qkv(9, B, T, T, N, K, H)
  kernel = cudnn_within(capacity)
  assert conds(lambda q, k, v: kernel(q, k, v, ids, scale=0.3), q, k, v) == 0
  check_kernel(kernel, q, k, v, ids, scale=0.3)


def test_cudnn_packed_without_a_capacity_keeps_its_cond(fake_cudnn):
  ids = packed_ids(np.random.default_rng(8), 2, 32)
  q, k, v = random_qkv(9, 2, 32, 32, 4, 2, 8)
  assert conds(lambda q, k, v: cudnn_within(None)(q, k, v, ids, scale=0.3), q, k, v) == 1


def test_segments_at_most_takes_a_positive_integer():
  for bad in (0, -3, 2.0, True, None):
    with pytest.raises(ValueError, match="max_segments_per_row must be a positive integer"):
      with attention_kernels.segments_at_most(bad):
        pass


# --------------------------------------------------------------------------------------
# Pallas (GPU) and splash (TPU) in interpret mode.


@pytest.mark.slow
@NEEDS_PALLAS_MHA
def test_pallas_interpret_matches_reference():
  B, T, N, K, H = 2, 16, 2, 1, 16
  ids = packed_ids(np.random.default_rng(4), B, T)
  q, k, v = random_qkv(5, B, T, T, N, K, H)
  kernel = functools.partial(attention_kernels.pallas_packed_causal, interpret=True)
  check_kernel(kernel, q, k, v, ids, scale=0.3)


@pytest.mark.slow
def test_splash_interpret_matches_reference():
  B, T, N, K, H = 1, 128, 2, 1, 8
  ids = packed_ids(np.random.default_rng(6), B, T, max_segments=5)
  q, k, v = random_qkv(7, B, T, T, N, K, H)
  kernel = functools.partial(attention_kernels.splash_packed_causal, interpret=True)
  check_kernel(kernel, q, k, v, ids, scale=0.3)


# --------------------------------------------------------------------------------------
# Selection: which implementation None picks, and clear errors for the names.


@pytest.fixture
def machine(monkeypatch):
  """Sets the probes the selection reads: machine(platform, capability, devices, cudnn, pallas),
  pallas: whether jax has the Pallas GPU kernel (only probed here: jax 0.12 has none)."""
  def set_machine(platform, capability=None, devices=1, cudnn=90800, pallas=True):
    monkeypatch.setattr(attention_choice.jax, "default_backend", lambda: platform)
    monkeypatch.setattr(attention_choice.jax, "device_count", lambda: devices)
    monkeypatch.setattr(attention_choice, "_cuda_capability", lambda: capability)
    api = None if cudnn is None else (emulated_cudnn, "PADDING_CAUSAL", cudnn)
    monkeypatch.setattr(attention_kernels, "_cudnn_private_api", lambda: api)
    monkeypatch.setattr(attention_kernels, "_pallas_mha",
                        lambda: ("mha", "BlockSizes") if pallas else None)
  return set_machine


def choose(implementation, query, packed_causal=True, has_mask_or_bias=True,
           batch_shared_bias=False):
  T = query.shape[1]
  return attention_choice.select_implementation(
      implementation, query, has_mask_or_bias=has_mask_or_bias, q_len=T, kv_len=T,
      return_weights=False, packed_causal=packed_causal, batch_shared_bias=batch_shared_bias)


def test_none_picks_a_fused_kernel_for_packed_causal_attention(machine):
  q = jnp.zeros((2, 128, 12, 64), jnp.bfloat16)  # GPT-2's heads
  machine("gpu", (9, 0))
  assert choose(None, q) == "cudnn_packed"
  assert choose(None, q, packed_causal=False) == "xla"  # a dense mask stays on XLA
  assert choose(None, q, packed_causal=False, has_mask_or_bias=False) == "cudnn"
  machine("gpu", (9, 0), cudnn=90500)
  assert choose(None, q) == "pallas"
  machine("gpu", (9, 0), cudnn=None, devices=8)
  assert choose(None, q) == "xla"
  machine("gpu", (8, 0))  # an A100: no packed cuDNN
  assert choose(None, q) == "pallas"
  machine("gpu", (8, 0), pallas=False)  # and jax 0.12: no Pallas kernel either
  assert choose(None, q) == "xla"
  machine("gpu", (8, 0))
  assert choose(None, q.astype(jnp.float32)) == "xla"
  assert choose(None, q[:, :100]) == "xla"  # Pallas blocks need 128 | T
  machine("tpu")
  assert choose(None, q) == "splash"
  assert choose(None, q[:, :100]) == "xla"
  machine("tpu", devices=4)
  assert choose(None, q) == "xla"
  machine("cpu")
  assert choose(None, q) == "xla"


def test_named_kernels_refuse_what_they_cannot_take(machine):
  q = jnp.zeros((2, 128, 4, 64), jnp.bfloat16)
  machine("cpu")
  with pytest.raises(ValueError, match="'pallas' cannot take this case: it needs a CUDA GPU"):
    choose("pallas", q)
  with pytest.raises(ValueError, match="'splash' cannot take this case: it needs a TPU"):
    choose("splash", q)
  machine("tpu", devices=4)
  assert choose("splash", q.astype(jnp.float32)) == "splash"  # by name: any dtype, any devices
  with pytest.raises(ValueError, match="only causal self-attention"):
    choose("splash", q, packed_causal=False)
  machine("gpu", (9, 0))
  assert choose("cudnn", q) == "cudnn_packed"
  machine("gpu", (8, 6))
  assert choose("cudnn", q) == "cudnn"  # the dense-bias path, as before
  with pytest.raises(ValueError, match="head_dim from 16 to 128"):
    choose("pallas", q[..., :8])
  machine("gpu", (9, 0), pallas=False)
  with pytest.raises(ValueError, match=r"'pallas' cannot take this case: jax \S+ has no Pallas"):
    choose("pallas", q)


def test_none_sends_a_batch_shared_bias_to_cudnn(machine):
  q = jnp.zeros((2, 16, 4, 64), jnp.bfloat16)
  machine("gpu", (9, 0))
  assert choose(None, q, packed_causal=False, batch_shared_bias=True) == "cudnn"
  assert choose(None, q, packed_causal=False) == "xla"
  assert choose(None, q.astype(jnp.float32), packed_causal=False, batch_shared_bias=True) == "xla"


def test_dispatch_sees_the_packed_case(monkeypatch):
  seen = []
  select = attention_choice.select_implementation
  monkeypatch.setattr(attention_choice, "select_implementation",
                      lambda *a, **kw: seen.append(kw) or select(*a, **kw))
  B, T, N, H = 2, 8, 2, 8
  q, k, v = random_qkv(8, B, T, T, N, N, H)
  ids = packed_ids(np.random.default_rng(8), B, T, max_segments=2)
  attend = lambda **kwargs: jax.eval_shape(functools.partial(dot_product_attention, **kwargs),
                                           q, k, v)
  attend(is_causal=True, query_segment_ids=ids, kv_segment_ids=ids)
  attend(is_causal=True, query_segment_ids=ids)
  attend(is_causal=True, query_segment_ids=ids, kv_segment_ids=ids + 0)
  attend(query_segment_ids=ids, kv_segment_ids=ids)
  attend(is_causal=True, query_segment_ids=ids, kv_segment_ids=ids,
         mask=np.ones((B, 1, T, T), bool))
  bias = np.zeros((1, N, T, T), np.float32)
  attend(is_causal=True, bias=bias)
  attend(bias=np.zeros((B, N, T, T), np.float32))
  assert [kw["packed_causal"] for kw in seen] == [True, True, False, False, False, False, False]
  assert [kw["batch_shared_bias"] for kw in seen] == [False] * 5 + [True, False]


@NEEDS_PALLAS_MHA
def test_packed_pallas_through_the_dispatcher(monkeypatch):
  """dot_product_attention(implementation="pallas") end to end, the kernel interpreted."""
  monkeypatch.setattr(attention_choice, "_packed_problem", lambda *args: None)
  monkeypatch.setattr(attention_kernels, "pallas_packed_causal", functools.partial(
      attention_kernels.pallas_packed_causal, interpret=True))
  B, T, N, K, H = 2, 16, 2, 1, 16
  ids = packed_ids(np.random.default_rng(9), B, T, max_segments=3)
  q, k, v = random_qkv(10, B, T, T, N, K, H)
  out = jax.jit(lambda q, k, v: dot_product_attention(
      q, k, v, is_causal=True, query_segment_ids=ids, kv_segment_ids=ids,
      implementation="pallas"))(q, k, v)
  expected, _ = numpy_attention(q, k, v, mask=packed_causal_mask(ids))
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


@NEEDS_PALLAS_MHA
def test_unpacked_causal_rows_reach_pallas_as_one_segment(monkeypatch):
  """Plain causal self-attention asked of "pallas" runs it (as model init does): one segment."""
  monkeypatch.setattr(attention_choice, "_packed_problem", lambda *args: None)
  monkeypatch.setattr(attention_kernels, "pallas_packed_causal", functools.partial(
      attention_kernels.pallas_packed_causal, interpret=True))
  B, T, N, H = 2, 16, 2, 16
  q, k, v = random_qkv(13, B, T, T, N, N, H)
  out = jax.jit(lambda q, k, v: dot_product_attention(
      q, k, v, is_causal=True, implementation="pallas"))(q, k, v)
  expected, _ = numpy_attention(q, k, v, mask=np.tril(np.ones((T, T), bool))[None, None])
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_cudnn_gets_a_batch_shared_bias_unbroadcast(monkeypatch):
  """The bias reaches cuDNN as [1, N, T, S] in the inputs' dtype (cuDNN spied on, run by XLA)."""
  seen = []
  xla = jax.nn.dot_product_attention
  def spy(*args, bias=None, implementation=None, **kwargs):
    seen.append((implementation, bias.shape, bias.dtype))
    return xla(*args, bias=bias, implementation="xla", **kwargs)
  monkeypatch.setattr(attention.jax.nn, "dot_product_attention", spy)
  monkeypatch.setattr(attention_choice, "_cudnn_problem", lambda *args: None)
  B, T, N, H = 3, 8, 2, 8
  q, k, v = random_qkv(11, B, T, T, N, N, H, dtype=jnp.bfloat16)
  bias = np.random.default_rng(12).normal(size=(1, N, T, T)).astype(np.float32)
  out = dot_product_attention(q, k, v, bias=bias, is_causal=True, implementation="cudnn")
  assert seen == [("cudnn", (1, N, T, T), jnp.bfloat16)]
  expected, _ = numpy_attention(q, k, v, mask=np.tril(np.ones((T, T), bool)), bias=bias)
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=3e-2, rtol=3e-2)


# --------------------------------------------------------------------------------------
# On a GPU, for real.


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("implementation", [
    "cudnn", pytest.param("pallas", marks=NEEDS_PALLAS_MHA), None])
def test_gpu_packed_kernels_match_reference(implementation):
  B, T, N, K, H = 2, 256, 4, 2, 64
  ids = packed_ids(np.random.default_rng(13), B, T, max_segments=6)
  q, k, v = random_qkv(14, B, T, T, N, K, H, dtype=jnp.bfloat16)
  run = lambda q, k, v: dot_product_attention(q, k, v, is_causal=True, query_segment_ids=ids,
                                              kv_segment_ids=ids, implementation=implementation)
  expected, expected_grads = expected_and_grads(*(x.astype(jnp.float32) for x in (q, k, v)),
                                                ids, 1 / np.sqrt(H))
  np.testing.assert_allclose(np.asarray(jax.jit(run)(q, k, v), np.float32), expected,
                             atol=3e-2, rtol=3e-2)
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(loss_weights(q.shape) * run(q, k, v)),
                           argnums=(0, 1, 2)))(q, k, v)
  for grad, want in zip(grads, expected_grads):
    np.testing.assert_allclose(np.asarray(grad, np.float32), want, atol=1e-1, rtol=1e-1)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_gpu_cudnn_batch_shared_bias_gradient():
  B, T, N, H = 4, 64, 4, 64
  q, k, v = random_qkv(15, B, T, T, N, N, H, dtype=jnp.bfloat16)
  bias = jnp.asarray(np.random.default_rng(16).normal(size=(1, N, T, T)), jnp.float32)
  grad = lambda impl: jax.grad(lambda b: jnp.sum(loss_weights(q.shape) * dot_product_attention(
      q, k, v, bias=b, is_causal=True, implementation=impl).astype(jnp.float32)))(bias)
  np.testing.assert_allclose(grad("cudnn"), grad("xla"), atol=1e-1, rtol=1e-1)
