"""train/engine/tasks.py: losses and metric sums of the four tasks, and that the sums add up; the
cross-entropy of train/engine/losses.py against its textbook definition.

References: label-smoothed cross-entropy written out in float64 numpy from its textbook
definition (Szegedy et al. 2016: q = (1 - s)·onehot + s/V; normalised by the entropy of q,
as t5x's `compute_weighted_cross_entropy`), the model's own logits fed to that numpy, the
same batch without its padding, and the whole batch on one device in one piece.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models import presets
from train.engine import losses, optim, tasks

VOCAB, BATCH, LENGTH, PADDED = 19, 8, 6, 9
TINY = dict(d_model=16, num_heads=2, d_ff=32, num_layers=1, max_len=16, dropout_rate=0.0)
PRESETS = {"lm": presets.gpt2, "seq2seq": presets.transformer_base,
           "classify": presets.bert_base, "mlm": presets.bert_base}


def log_softmax(logits):
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def smoothed_target(targets, vocab, smoothing):
  return (1 - smoothing) * np.eye(vocab)[targets] + smoothing / vocab


def reference_cross_entropy(logits, targets, smoothing):
  """-sum q log p - H(q), in float64: KL(q || p), 0 exactly when p = q."""
  q = smoothed_target(targets, logits.shape[-1], smoothing)
  entropy = -np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0), -1)
  return -np.sum(q * log_softmax(logits.astype(np.float64)), -1) - entropy


# ------------------------------------------------------------------------------------------
# The loss itself.


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.4])
def test_smoothed_cross_entropy_is_the_textbook_one(smoothing):
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (4, 5, VOCAB)).astype(np.float32)
  targets = rng.integers(0, VOCAB, (4, 5))
  got, _ = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), smoothing)
  np.testing.assert_allclose(got, reference_cross_entropy(logits, targets, smoothing),
                             rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got) > 0)  # a random prediction is not the target


@pytest.mark.parametrize("smoothing", [0.1, 0.4])
def test_predicting_the_smoothed_target_scores_zero(smoothing):
  targets = np.arange(VOCAB)
  logits = np.log(smoothed_target(targets, VOCAB, smoothing)) + 7.0  # softmax ignores the shift
  got, _ = losses.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                                smoothing)
  np.testing.assert_allclose(got, 0.0, atol=2e-6)


def test_without_smoothing_a_peaked_prediction_tends_to_zero():
  targets = np.arange(VOCAB)
  maxima = []
  for margin in (2.0, 8.0, 32.0):
    logits = jnp.asarray(margin * np.eye(VOCAB), jnp.float32)
    loss = np.asarray(losses.cross_entropy(logits, jnp.asarray(targets), 0.0)[0])
    # Exactly log(1 + (V - 1) e^-margin) for a margin over every other logit.
    np.testing.assert_allclose(loss, np.log1p((VOCAB - 1) * np.exp(-margin)), rtol=1e-5,
                               atol=1e-7)
    maxima.append(loss.max())
  assert maxima[0] > maxima[1] > maxima[2] and maxima[2] < 1e-7


def test_summarize_divides_by_the_weight():
  summary = tasks.summarize({"loss": 6.0, "correct": 3.0, "weight": 4.0})
  assert summary == pytest.approx({"loss": 1.5, "accuracy": 0.75, "perplexity": np.exp(1.5)})
  assert tasks.summarize({"loss": 0.0, "correct": 0.0, "weight": 0.0})["loss"] == 0.0


# ------------------------------------------------------------------------------------------
# Classification metrics against scikit-learn's on the same predictions.


def class_metrics_of(logits, labels, weights) -> dict:
  return tasks.class_metrics(*(tasks.class_sums(jnp.asarray(logits), jnp.asarray(labels),
                                                jnp.asarray(weights))[k] for k in tasks.CLASS_SUMS))


# (classes, which predictions to redirect, what is left out): classes never predicted, a class
# never labelled nor predicted (scikit-learn's macro average leaves it out; its precision and
# recall are 0), binary with and without a predicted positive.
CLASS_CASES = {"3 classes, 2 never predicted": (3, {2: 0}),
               "4 classes, 3 nowhere": (4, {3: 1}),
               "binary": (2, {}),
               "binary, positive never predicted": (2, {1: 0})}


@pytest.mark.parametrize("case", CLASS_CASES)
def test_class_metrics_are_scikit_learns_with_zero_division_0(case):
  from sklearn import metrics as sk
  classes, redirect = CLASS_CASES[case]
  rng = np.random.default_rng(len(case))
  labels = rng.integers(0, classes, 64)
  if classes == 4:
    labels[labels == 3] = 2
  predicted = np.where(rng.random(64) < 0.6, labels, rng.integers(0, classes, 64))
  for source, target in redirect.items():
    predicted[predicted == source] = target
  logits = rng.normal(0, 1, (64, classes)) + 20.0 * np.eye(classes)[predicted]
  weights = rng.uniform(0.5, 2.0, 64) * (rng.random(64) > 0.2)  # a fifth weigh 0 (padding)
  got = class_metrics_of(logits.astype(np.float32), labels, weights.astype(np.float32))
  # scikit-learn sees the rows that weigh something: padding rows are not examples.
  real = weights > 0
  y, p, w = labels[real], predicted[real], weights[real]
  everything = list(range(classes))
  expected = {"f1_macro": sk.f1_score(y, p, average="macro", sample_weight=w, zero_division=0)}
  if classes == 2:
    expected["f1"] = sk.f1_score(y, p, average="binary", sample_weight=w, zero_division=0)
  for name, score in (("precision", sk.precision_score), ("recall", sk.recall_score)):
    per_class = score(y, p, labels=everything, average=None, sample_weight=w, zero_division=0)
    expected.update({f"{name}_{c}": v for c, v in enumerate(per_class)})
  assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
  assert not set(redirect) & set(predicted)  # the case is what it says


def test_the_classify_eval_alone_sums_per_class_and_summarize_reports_them(setups):
  task, params, batch, _ = setups["classify"]
  logits = np.asarray(task.apply(params, batch))
  # dropout_rate 0: the same logits in both
  _, train_sums = jax.jit(lambda p, b: task.loss(p, b, jax.random.key(0), train=True))(
      params, batch)
  _, eval_sums = jax.jit(task.loss)(params, batch)
  assert train_sums.keys() == {"loss", "correct", "weight"}
  summary = tasks.summarize(jax.device_get(eval_sums))
  assert summary == {**tasks.summarize(jax.device_get(train_sums)),
                     **class_metrics_of(logits, batch["label"], batch["weights"])}
  assert {"f1_macro", "precision_2", "recall_0"} <= summary.keys() and "f1" not in summary
  # The all-zero batch a process short of eval data reads (inputs.BatchLayout.lockstep).
  _, empty = jax.jit(task.loss)(params, jax.tree.map(np.zeros_like, batch))
  for key in tasks.CLASS_SUMS:
    np.testing.assert_array_equal(empty[key], np.zeros(3), err_msg=key)


# ------------------------------------------------------------------------------------------
# Tiny models and batches of each task.


def packed_rows(rng, lengths_B, length):
  """Segment ids (1, 2 for two packed sequences where a row has room; 0 = padding) and
  positions per segment."""
  segments = np.zeros((len(lengths_B), length), np.int32)
  positions = np.zeros_like(segments)
  for row, used in enumerate(lengths_B):
    split = rng.integers(1, used) if used > 1 else 1
    segments[row, :split], segments[row, split:used] = 1, 2
    positions[row, :split] = np.arange(split)
    positions[row, split:used] = np.arange(used - split)
  return segments, positions


def make_batch(task: str, seed: int = 0) -> dict:
  """A batch of BATCH rows of LENGTH tokens whose rows carry unequal weights."""
  rng = np.random.default_rng(seed)
  tokens = lambda *shape: rng.integers(1, VOCAB, shape).astype(np.int32)
  lengths_B = np.array([6, 1, 3, 6, 2, 5, 4, 6])
  valid_BT = np.arange(LENGTH) < lengths_B[:, None]
  if task == "lm":
    segments, positions = packed_rows(rng, lengths_B, LENGTH)
    return {"inputs": tokens(BATCH, LENGTH), "targets": tokens(BATCH, LENGTH),
            "weights": (segments > 0).astype(np.float32), "segment_ids": segments,
            "positions": positions}
  if task == "seq2seq":
    # Pairs are packed on both sides alike: a row's segments are the same on each side.
    encoder_segments, encoder_positions = packed_rows(rng, lengths_B, LENGTH)
    segments, positions = packed_rows(rng, lengths_B, LENGTH)
    return {"encoder_tokens": tokens(BATCH, LENGTH), "decoder_inputs": tokens(BATCH, LENGTH),
            "decoder_targets": tokens(BATCH, LENGTH),
            "weights": (segments > 0).astype(np.float32),
            "encoder_segment_ids": encoder_segments, "decoder_segment_ids": segments,
            "encoder_positions": encoder_positions, "decoder_positions": positions}
  row = {"tokens": tokens(BATCH, LENGTH), "padding_mask": valid_BT,
         "token_types": (np.arange(LENGTH) >= lengths_B[:, None] // 2).astype(np.int32)}
  if task == "classify":  # row 1 is a dropped example: weight 0
    return {**row, "label": rng.integers(0, 3, BATCH).astype(np.int32),
            "weights": (np.arange(BATCH) != 1).astype(np.float32)}
  masked = valid_BT & (rng.random((BATCH, LENGTH)) < 0.5)
  masked[:, 0] = True
  return {**row, "targets": tokens(BATCH, LENGTH), "weights": masked.astype(np.float32)}


def init_params(task: tasks.Task, batch: dict):
  inputs = {"lm": ["inputs"], "seq2seq": ["encoder_tokens", "decoder_inputs"]}.get(
      task.name, ["tokens"])
  init = lambda key: nn.unbox(task.model.init(key, *(batch[k] for k in inputs))["params"])
  return jax.jit(init)(jax.random.key(1))


def loss_and_grad(task: tasks.Task):
  """As the training step: value_and_grad of (objective sum, (weight sum, metric sums))."""
  def loss_fn(params, batch, rng):
    objective, sums = task.loss(params, batch, rng)
    return objective, (sums["weight"], sums)
  return jax.value_and_grad(loss_fn, has_aux=True)


@pytest.fixture(scope="module")
def setups():
  """{task: (Task with label smoothing 0.1, params, batch, jitted loss_and_grad)}, built once."""
  out = {}
  for name in tasks.TASKS:
    batch = make_batch(name)
    task = tasks.Task(name, tasks.make_model(name, PRESETS[name](VOCAB, **TINY), num_classes=3),
                      label_smoothing=0.1)
    out[name] = (task, init_params(task, batch), batch, jax.jit(loss_and_grad(task)))
  return out


# ------------------------------------------------------------------------------------------
# Task.loss: weighted sums of the numpy losses.


@pytest.mark.parametrize("name", tasks.TASKS)
def test_loss_sums_are_the_weighted_numpy_losses(name, setups):
  task, params, batch, _ = setups[name]
  logits = np.asarray(task.apply(params, batch), np.float64)
  targets, weights = task.targets(batch)
  objective, sums = jax.jit(task.loss)(params, batch)
  nll = reference_cross_entropy(logits, targets, 0.0)
  smoothed = reference_cross_entropy(logits, targets, 0.1)
  np.testing.assert_allclose(objective, np.sum(weights * smoothed), rtol=1e-5)
  np.testing.assert_allclose(sums["loss"], np.sum(weights * nll), rtol=1e-5)
  assert float(sums["correct"]) == np.sum(weights * (logits.argmax(-1) == targets))
  assert float(sums["weight"]) == np.sum(weights)


TARGETS = {"lm": "targets", "seq2seq": "decoder_targets", "classify": "label", "mlm": "targets"}
TOKENS = ("inputs", "decoder_inputs", "encoder_tokens", "tokens")


def pad(name: str, batch: dict, rng) -> dict:
  """The batch widened to PADDED tokens, its padding holding random tokens and targets, and
  every weight-0 target changed."""
  extra = PADDED - LENGTH
  widened = {}
  for key, value in batch.items():
    if value.ndim == 2:
      value = np.concatenate([value, np.zeros((BATCH, extra), value.dtype)], 1)
      if key in TOKENS + (TARGETS[name],):
        value[:, LENGTH:] = rng.integers(1, VOCAB, (BATCH, extra))
    widened[key] = value
  targets, classes = widened[TARGETS[name]].copy(), 3 if name == "classify" else VOCAB
  unweighted = widened["weights"] == 0
  targets[unweighted] = (targets[unweighted] + rng.integers(1, classes, unweighted.sum())) % classes
  widened[TARGETS[name]] = targets
  return widened


@pytest.mark.parametrize("name", tasks.TASKS)
def test_padding_and_weight_zero_targets_contribute_nothing(name, setups):
  task, params, batch, _ = setups[name]
  padded = pad(name, batch, np.random.default_rng(2))
  loss = jax.jit(task.loss)
  expected_objective, expected = loss(params, batch)
  objective, sums = loss(params, padded)
  np.testing.assert_allclose(objective, expected_objective, rtol=1e-5)
  assert sums.keys() == expected.keys()
  for key in expected:  # classify's per-class sums too
    np.testing.assert_allclose(sums[key], expected[key], rtol=1e-5, err_msg=key)


# ------------------------------------------------------------------------------------------
# Sums add up: over microbatches and over devices.


@pytest.mark.parametrize("name", tasks.TASKS)
def test_microbatch_sums_add_up_to_the_whole_batch(name, setups):
  task, params, batch, jitted_loss_and_grad = setups[name]
  whole = optim.accumulate_gradients(jitted_loss_and_grad, params, batch, 1)
  split = jax.jit(optim.accumulate_gradients, static_argnums=(0, 3))(
      loss_and_grad(task), params, batch, 4)
  # Microbatch i holds rows i and i + 4; their weights differ, so a mean of the microbatches'
  # means would not be the batch's mean.
  _, weights = task.targets(batch)
  rows = weights.reshape(BATCH, -1).sum(1)
  assert len(set(rows[:4] + rows[4:])) > 1
  np.testing.assert_allclose(split.loss, whole.loss, rtol=1e-5)
  np.testing.assert_allclose(whole.loss * whole.weight, task.loss(params, batch)[0], rtol=1e-5)
  assert float(split.weight) == float(whole.weight) == weights.sum()
  for key in ("loss", "correct", "weight"):
    np.testing.assert_allclose(split.metrics[key], whole.metrics[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               split.grads, whole.grads)


@pytest.mark.parametrize("name", tasks.TASKS)
def test_a_batch_sharded_over_8_devices_gives_the_one_device_sums(name, setups):
  _, params, batch, jitted_loss_and_grad = setups[name]
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ("data",))
  on_one = jitted_loss_and_grad(params, batch, None)
  sharded_batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
  replicated_params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  on_eight = jitted_loss_and_grad(replicated_params, sharded_batch, None)
  assert len(sharded_batch[TARGETS[name]].sharding.device_set) == 8
  assert sharded_batch[TARGETS[name]].sharding.shard_shape((BATCH,)) == (1,)
  (objective, (_, sums)), grads = on_eight
  (expected_objective, (_, expected)), expected_grads = on_one
  np.testing.assert_allclose(objective, expected_objective, rtol=1e-5)
  for key in expected:  # classify's per-class sums too
    np.testing.assert_allclose(sums[key], expected[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               grads, expected_grads)
