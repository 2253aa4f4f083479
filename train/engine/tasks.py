"""One place per task: which model it trains, and batch -> loss and metrics.

Losses are returned as sums with their weights, so that microbatches, devices and eval
batches add up exactly: the training objective is `objective / weight`.

  lm        DecoderOnly      next-token cross-entropy over packed rows
  seq2seq   EncoderDecoder   teacher-forced cross-entropy, optional label smoothing
  classify  EncoderClassifier  one label per row
  mlm       EncoderMaskedLM  cross-entropy on the masked positions

Metric sums: "loss" (cross-entropy, unsmoothed), "correct" (hits: the target's logit is the
row's maximum, which is argmax's hit but for ties, where each tied id counts; see
losses.token_losses), "weight" (targets counted); `summarize` turns them into loss, accuracy
and perplexity. A classify eval (train=False) also sums, per class, the weights of its argmax
predictions that are right, of its predictions and of its labels ([C] vectors), which
`summarize` turns into F1 and per-class precision and recall (`class_metrics`).
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import transformer
from models.config import TransformerConfig
from models.errors import InputError
from train.engine import losses

TASKS = ("lm", "seq2seq", "classify", "mlm")
PADDED_VOCAB_TASKS = ("lm", "seq2seq")  # their decoders give the loss the padded logits


@dataclasses.dataclass(frozen=True)
class Task:
  """A task's model, inputs and loss; hashable, so it can close over a jitted step."""
  name: str
  model: nn.Module
  label_smoothing: float = 0.0

  def __post_init__(self):
    if self.name not in TASKS:
      raise InputError(f"Unknown task {self.name!r}; choose from {TASKS}.")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise InputError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")

  def apply(self, params, batch, *, rng=None, train: bool = False, padded_vocab: bool = False):
    """The model's logits for a batch: [B, T, V] (token tasks) or [B, C] (classify);
    `padded_vocab`: the decoders' padded width (models/transformer.py), for the loss.

    Token tasks take packed rows' segment ids and positions where the batch has them; rows of
    one example come without (train.run.inputs.BatchLayout), seq2seq's with an encoder padding
    mask, and the attention is then plain causal (or padding-masked) attention."""
    rngs = {"dropout": rng} if train else {}
    kwargs = dict(deterministic=not train, rngs=rngs)
    if padded_vocab and self.name in PADDED_VOCAB_TASKS:
      kwargs["padded_vocab"] = True
    variables = {"params": params}
    if self.name == "lm":
      return self.model.apply(variables, batch["inputs"], segment_ids=batch.get("segment_ids"),
                              positions=batch.get("positions"), **kwargs)
    if self.name == "seq2seq":
      return self.model.apply(
          variables, batch["encoder_tokens"], batch["decoder_inputs"],
          encoder_padding_mask=batch.get("encoder_padding_mask"),
          encoder_segment_ids=batch.get("encoder_segment_ids"),
          decoder_segment_ids=batch.get("decoder_segment_ids"),
          encoder_positions=batch.get("encoder_positions"),
          decoder_positions=batch.get("decoder_positions"), **kwargs)
    return self.model.apply(variables, batch["tokens"], padding_mask=batch["padding_mask"],
                            token_types=batch["token_types"], **kwargs)

  def targets(self, batch):
    """(targets, weights) aligned with the logits' leading axes."""
    if self.name == "lm":
      return batch["targets"], batch["weights"]
    if self.name == "seq2seq":
      return batch["decoder_targets"], batch["weights"]
    if self.name == "classify":
      return batch["label"], batch["weights"]
    return batch["targets"], batch["weights"]

  def loss(self, params, batch, rng=None, train: bool = False):
    """(objective_sum, metric_sums): the smoothed training loss summed over weights; a
    classify eval (`train` False) adds the per-class sums of `class_sums`.

    The logits stay in the model's logits_dtype (bf16 on accelerators) and, for the decoders,
    at the padded vocabulary's width; train/engine/losses.py computes the softmax in float32 without
    keeping a float32 copy of them, masks the padded columns, and counts the hits in the same
    pass (no argmax over the logits)."""
    logits = self.apply(params, batch, rng=rng, train=train, padded_vocab=True)
    targets, weights = self.targets(batch)
    weights = weights.astype(jnp.float32)
    vocab = self.model.cfg.vocab_size if self.name in PADDED_VOCAB_TASKS else None
    out = losses.token_losses(logits, targets, self.label_smoothing, vocab)
    metrics = {"loss": jnp.sum(out.nll * weights), "correct": jnp.sum(out.correct * weights),
               "weight": jnp.sum(weights)}
    if self.name == "classify" and not train:
      metrics.update(class_sums(logits, targets, weights))
    return jnp.sum(out.objective * weights), metrics


CLASS_SUMS = ("class_true_positives", "class_predicted", "class_actual")


def class_sums(logits_BC, labels_B, weights_B) -> dict:
  """Per class [C]: the weights of the rows predicted (argmax; the first of tied logits) and
  labelled as it, of those predicted as it, and of those labelled as it."""
  num_classes = logits_BC.shape[-1]
  labelled_BC = jax.nn.one_hot(labels_B, num_classes)
  predicted_BC = jax.nn.one_hot(jnp.argmax(logits_BC, -1), num_classes) * weights_B[:, None]
  return dict(zip(CLASS_SUMS, ((predicted_BC * labelled_BC).sum(0), predicted_BC.sum(0),
                               (labelled_BC * weights_B[:, None]).sum(0))))


def class_metrics(true_positives_C, predicted_C, actual_C) -> dict:
  """F1 and per-class precision and recall from `class_sums`, as scikit-learn's with
  zero_division=0 (a ratio over a zero weight is 0): "f1" binary, class 1 the positive one
  (two classes only); "f1_macro" the mean of the classes' F1 over those predicted or labelled
  (scikit-learn's default labels), "precision_C" and "recall_C" for every class C."""
  true_positives_C, predicted_C, actual_C = (
      np.asarray(x, np.float64) for x in (true_positives_C, predicted_C, actual_C))
  ratio = lambda num, den: np.divide(num, den, out=np.zeros_like(num), where=den > 0)
  precision_C, recall_C = ratio(true_positives_C, predicted_C), ratio(true_positives_C, actual_C)
  f1_C = ratio(2 * true_positives_C, predicted_C + actual_C)
  present_C = predicted_C + actual_C > 0
  out = {"f1": float(f1_C[1])} if len(f1_C) == 2 else {}
  out["f1_macro"] = float(f1_C[present_C].mean()) if present_C.any() else 0.0
  for c in range(len(f1_C)):
    out[f"precision_{c}"], out[f"recall_{c}"] = float(precision_C[c]), float(recall_C[c])
  return out


def summarize(sums: dict) -> dict:
  """Metric sums -> loss, accuracy and perplexity per target; with a classify eval's class sums,
  also F1 and per-class precision and recall (`class_metrics`)."""
  weight = max(float(sums["weight"]), 1e-9)
  loss = float(sums["loss"]) / weight
  out = {"loss": loss, "accuracy": float(sums["correct"]) / weight,
         "perplexity": math.exp(min(loss, 50.0))}
  if CLASS_SUMS[0] in sums:
    out.update(class_metrics(*(sums[k] for k in CLASS_SUMS)))
  return out


def make_model(task: str, model_cfg: TransformerConfig, *, num_classes: int = 0,
               pooling: str = "cls") -> nn.Module:
  if task == "lm":
    return transformer.DecoderOnly(model_cfg)
  if task == "seq2seq":
    return transformer.EncoderDecoder(model_cfg)
  if task == "classify":
    if num_classes < 2:
      raise InputError(f"classify needs num_classes >= 2, got {num_classes}.")
    return transformer.EncoderClassifier(model_cfg, num_classes, pooling)
  if task == "mlm":
    return transformer.EncoderMaskedLM(model_cfg)
  raise InputError(f"Unknown task {task!r}; choose from {TASKS}.")


def init_inputs(task: str, data) -> tuple:
  """Inputs of the model's shapes for `model.init`: one row of zeros per model argument."""
  if task == "seq2seq":
    return (jnp.zeros((1, data.inputs_len), jnp.int32), jnp.zeros((1, data.targets_len), jnp.int32))
  return (jnp.zeros((1, data.seq_len), jnp.int32),)
