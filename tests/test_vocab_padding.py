"""TransformerConfig.vocab_pad_multiple: a token table and logits layer rounded up, invisible
outside the model.

References: the unpadded model with the padded one's real rows (cut by hand), whose padded
rows are set huge so that any leak into a softmax or an argmax shows; transformers (PyTorch,
CPU) reading the exported folder.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import paths, presets, pretrained
from models.pretrained_export import to_hf
from models.transformer import DecoderOnly, EncoderDecoder, EncoderMaskedLM
from train.engine import tasks

VOCAB, MULTIPLE, PADDED = 50, 16, 64
TINY = dict(vocab_size=VOCAB, d_model=24, num_heads=3, d_ff=40, num_layers=1, max_len=16)


def padded_and_plain(module_cls, cfg, seed=0, num_inputs=1):
  """(padded module, its params with huge padded rows, the unpadded module, the real rows)."""
  padded = module_cls(cfg.replace(vocab_pad_multiple=MULTIPLE))
  plain = module_cls(cfg)
  tokens = (jnp.zeros((1, 4), jnp.int32),) * num_inputs
  params = nn.meta.unbox(padded.init(jax.random.key(seed), *tokens)["params"])
  flat = {p: np.array(x) for p, x in paths.flatten(params).items()}
  real = {}
  for p, x in flat.items():
    if "embedding" in p and x.shape[0] == PADDED:
      x[VOCAB:] = 100.0
      real[p] = x[:VOCAB]
    elif p.endswith("logits_dense/kernel"):
      x[:, VOCAB:] = 100.0
      real[p] = x[:, :VOCAB]
    else:
      real[p] = x
  assert set(real) == set(paths.flatten(jax.eval_shape(plain.init, jax.random.key(0), *tokens)
                                        ["params"]))
  return padded, paths.unflatten(flat), plain, paths.unflatten(real)


def lm_batch(seed=1):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (2, 9)).astype(np.int32)
  segments = np.ones_like(tokens)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments[:, 1:],
          "positions": np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8)),
          "weights": np.ones((2, 8), np.float32)}


def test_the_padded_size_rounds_up():
  cfg = presets.gpt2(vocab_pad_multiple=128)
  assert (cfg.vocab_size, cfg.padded_vocab_size) == (50_257, 50_304)
  assert presets.gpt2(vocab_size=256, vocab_pad_multiple=128).padded_vocab_size == 256
  with pytest.raises(ValueError, match="vocab_pad_multiple must be positive"):
    presets.gpt2(vocab_pad_multiple=0)


@pytest.mark.parametrize("tie_output", [True, False])
def test_a_padded_lm_has_the_real_vocabulary_and_the_unpadded_loss(tie_output):
  padded, padded_params, plain, plain_params = padded_and_plain(
      DecoderOnly, presets.gpt2(**TINY, tie_output=tie_output))
  batch = lm_batch()
  logits = padded.apply({"params": padded_params}, batch["inputs"])
  assert logits.shape == (2, 8, VOCAB)
  np.testing.assert_allclose(logits, plain.apply({"params": plain_params}, batch["inputs"]),
                             rtol=1e-5, atol=1e-5)
  padded_loss = tasks.Task("lm", padded, 0.1).loss(padded_params, batch)
  plain_loss = tasks.Task("lm", plain, 0.1).loss(plain_params, batch)
  np.testing.assert_allclose(padded_loss[0], plain_loss[0], rtol=1e-5)
  for name in ("loss", "correct", "weight"):
    np.testing.assert_allclose(padded_loss[1][name], plain_loss[1][name], rtol=1e-5)


def sliced_loss(model, smoothing):
  """The loss over the sliced logits (the model's default output), by optax: (objective sum,
  nll sum, argmax hits) with the objective less the smoothed labels' entropy."""
  def loss(params, batch):
    logits = model.apply({"params": params}, batch["inputs"])
    onehot = jax.nn.one_hot(batch["targets"], VOCAB)
    q = optax.smooth_labels(onehot, smoothing)
    entropy = -jnp.sum(q * jnp.log(q), -1)
    w = batch["weights"]
    objective = jnp.sum(w * (optax.softmax_cross_entropy(logits, q) - entropy))
    nll = jnp.sum(w * optax.softmax_cross_entropy(logits, onehot))
    return objective, (nll, jnp.sum(w * (jnp.argmax(logits, -1) == batch["targets"])))
  return loss


@pytest.mark.parametrize("tie_output", [True, False])
def test_the_lm_loss_reads_the_padded_logits_with_the_sliced_results(tie_output):
  """Task.loss takes the padded logits (padded rows huge here) unsliced: the loss, metrics and
  gradients of the sliced logits by optax, and no gradient for the padded rows."""
  padded, params, _, _ = padded_and_plain(DecoderOnly, presets.gpt2(**TINY, tie_output=tie_output))
  batch = jax.tree.map(jnp.asarray, lm_batch())
  wide = padded.apply({"params": params}, batch["inputs"], padded_vocab=True)
  assert wide.shape == (2, 8, PADDED)
  np.testing.assert_array_equal(wide[..., :VOCAB], padded.apply({"params": params},
                                                                  batch["inputs"]))
  task = tasks.Task("lm", padded, 0.1)
  (objective, sums), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch)
  (want_objective, (want_nll, want_hits)), want_grads = jax.value_and_grad(
      sliced_loss(padded, 0.1), has_aux=True)(params, batch)
  np.testing.assert_allclose(objective, want_objective, rtol=1e-5)
  np.testing.assert_allclose(sums["loss"], want_nll, rtol=1e-6)
  assert float(sums["correct"]) == float(want_hits)
  for path, grad in paths.flatten(grads).items():
    want = paths.flatten(want_grads)[path]
    scale = max(1.0, float(np.abs(want).max()))  # float32 rounding of sums of that size
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6 * scale, err_msg=path)
    if "embedding" in path and grad.shape[0] == PADDED:
      np.testing.assert_array_equal(grad[VOCAB:], 0.0, err_msg=path)
    elif path.endswith("logits_dense/kernel"):
      np.testing.assert_array_equal(grad[:, VOCAB:], 0.0, err_msg=path)
  jaxpr = str(jax.make_jaxpr(task.loss)(params, batch))
  assert "argmax" not in jaxpr and f"limit_indices=(2, 8, {VOCAB})" not in jaxpr


def test_a_padded_seq2seq_loss_is_the_unpadded_one():
  """EncoderDecoder's decoder gives Task.loss the padded logits too: the unpadded model's loss,
  metrics and gradients (its rows), and none for the padded rows."""
  cfg = presets.transformer_base(vocab_size=VOCAB, d_model=24, num_heads=3, d_ff=40,
                                 num_layers=1, max_len=16, dropout_rate=0.0)
  padded, padded_params, plain, plain_params = padded_and_plain(EncoderDecoder, cfg,
                                                                num_inputs=2)
  lm = lm_batch()
  batch = {"encoder_tokens": lm["targets"], "decoder_inputs": lm["inputs"],
           "decoder_targets": lm["targets"], "weights": lm["weights"],
           "encoder_segment_ids": lm["segment_ids"], "decoder_segment_ids": lm["segment_ids"],
           "encoder_positions": lm["positions"], "decoder_positions": lm["positions"]}
  loss = lambda module: jax.value_and_grad(tasks.Task("seq2seq", module, 0.1).loss,
                                           has_aux=True)
  (objective, sums), grads = loss(padded)(padded_params, batch)
  (want_objective, want_sums), want_grads = loss(plain)(plain_params, batch)
  np.testing.assert_allclose(objective, want_objective, rtol=1e-5)
  for name in ("loss", "correct", "weight"):
    np.testing.assert_allclose(sums[name], want_sums[name], rtol=1e-5)
  for path, grad in paths.flatten(grads).items():
    want = paths.flatten(want_grads)[path]
    if grad.shape != want.shape:  # a padded table: its real rows, and zeros
      np.testing.assert_array_equal(grad[VOCAB:], 0.0, err_msg=path)
      grad = grad[:VOCAB]
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6 * scale, err_msg=path)


def test_a_padded_masked_lm_has_the_real_vocabulary():
  cfg = presets.bert_base(vocab_size=VOCAB, d_model=24, num_heads=3, d_ff=40, num_layers=1,
                          max_len=16)
  padded, padded_params, plain, plain_params = padded_and_plain(EncoderMaskedLM, cfg)
  tokens = lm_batch()["inputs"]
  logits = padded.apply({"params": padded_params}, tokens)
  assert logits.shape == (2, 8, VOCAB)
  np.testing.assert_allclose(logits, plain.apply({"params": plain_params}, tokens), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("tie_output", [True, False])
def test_a_padded_model_exports_its_real_rows_and_imports_padded_again(tie_output, tmp_path):
  torch = pytest.importorskip("torch")  # not in CI's Python 3.12 run
  transformers = pytest.importorskip("transformers")
  padded, padded_params, plain, plain_params = padded_and_plain(
      DecoderOnly, presets.gpt2(**TINY, tie_output=tie_output))
  hf = to_hf(padded, padded_params, str(tmp_path))
  assert hf["vocab_size"] == VOCAB
  tokens = lm_batch()["inputs"]
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  with torch.no_grad():
    reference = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  ours = padded.apply({"params": padded_params}, tokens)
  np.testing.assert_allclose(ours, reference, atol=1e-4)

  imported, imported_params = pretrained.from_hf(str(tmp_path))
  assert imported.cfg.vocab_pad_multiple == 1
  for path, x in paths.flatten(plain_params).items():
    np.testing.assert_array_equal(paths.flatten(imported_params)[path], x, err_msg=path)

  repadded, repadded_params = pretrained.from_hf(str(tmp_path), vocab_pad_multiple=MULTIPLE)
  assert repadded.cfg.padded_vocab_size == PADDED
  np.testing.assert_allclose(repadded.apply({"params": repadded_params}, tokens), ours,
                             rtol=1e-5, atol=1e-5)
