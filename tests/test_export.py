"""models/pretrained_export.py: tapete models written as Hugging Face folders, read back by
transformers (PyTorch, CPU) and by from_hf.

One tiny model with random weights per family and head (module-scoped): transformers'
AutoModel* of the exported folder computes the same outputs (max |Δ| <= 1e-4, fp32, padded
batches), and from_hf of the folder gives back the identical params. Nothing is downloaded.
"""

import jax
import numpy as np
import pytest
import torch
import transformers

from models import paths, presets, pretrained
from models.pretrained_export import hf_tensors, to_hf
from models.pretrained_tables import PretrainedError, Row
from models.transformer import (DecoderOnly, EncoderClassifier, EncoderDecoder, EncoderMaskedLM,
                                EncoderOnly)

TOL = 1e-4
VOCAB = 61
DECODER = dict(vocab_size=VOCAB, d_model=32, num_heads=4, num_kv_heads=2, d_ff=40,
               num_layers=2, max_len=64)
BERT = presets.bert_base(vocab_size=VOCAB, d_model=32, num_heads=4, d_ff=48, num_layers=2,
                         max_len=16)
T5 = dict(vocab_size=VOCAB, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_layers=2)

MODELS = {
    # Tied output, layers under nn.scan.
    "gpt2": lambda: DecoderOnly(presets.gpt2(vocab_size=VOCAB, d_model=24, num_heads=3, d_ff=40,
                                             num_layers=2, max_len=16, scan_layers=True)),
    # An output layer of its own, exact GELU.
    "gpt2_untied": lambda: DecoderOnly(presets.gpt2(
        vocab_size=VOCAB, d_model=24, num_heads=3, d_ff=40, num_layers=1, max_len=16,
        activation="gelu", tie_output=False)),
    "bert": lambda: EncoderOnly(BERT),
    "bert_classifier": lambda: EncoderClassifier(BERT, num_classes=3),
    "bert_mlm": lambda: EncoderMaskedLM(BERT.replace(num_token_types=3, activation="relu",
                                                     norm_epsilon=1e-5)),
    "t5_v1_0": lambda: EncoderDecoder(presets.t5_v1_0(
        **T5, num_decoder_layers=1, relative_buckets=8, relative_max_distance=12)),
    "t5_v1_1": lambda: EncoderDecoder(presets.t5_v1_1(**T5, num_decoder_layers=3)),
    # Grouped-query; llama3 RoPE scaling; biases on the attention projections, none in the MLP;
    # an output layer of its own.
    "llama": lambda: DecoderOnly(presets.llama3(
        **DECODER, rope_max_wavelength=500.0, rope_llama3_factor=8.0,
        rope_llama3_low_freq_factor=0.5, rope_llama3_high_freq_factor=2.0,
        rope_llama3_original_max_len=16, use_bias=True, ffn_bias=False)),
    # A window of 4 keys, shorter than the rows.
    "mistral": lambda: DecoderOnly(presets.mistral(**DECODER, sliding_window=4)),
    # Biases on query, key and value; tied output.
    "qwen2": lambda: DecoderOnly(presets.qwen2(**DECODER, tie_output=True)),
    # One key/value head and head_dim 12 (not 32 / 4).
    "gemma": lambda: DecoderOnly(presets.gemma(**{**DECODER, "num_kv_heads": 1}, head_dim=12)),
}
HEADS = {EncoderClassifier: "classifier", EncoderMaskedLM: "mlm"}


def random_params(module, seed: int) -> dict:
  """Weights large enough that every tensor matters: a mapping bug shows in the outputs."""
  shapes = pretrained._flat(jax.eval_shape(module.init, jax.random.key(0),
                                           *pretrained._init_args(module))["params"])
  rng = np.random.RandomState(seed)
  params = {}
  for path, leaf in sorted(shapes.items()):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    name = path.split("/")[-1]
    shape = leaf.shape[1:] if "layers/" in path and module.cfg.scan_layers else leaf.shape
    if name == "scale":
      params[path] = 0.5 + 0.2 * noise
    elif len(shape) == 1:  # Biases.
      params[path] = 0.2 * noise
    elif name in ("embedding", "rel_embedding"):  # Gemma scales its inputs by √d.
      params[path] = noise / np.sqrt(module.cfg.d_model) if module.cfg.scale_embeddings else noise
    else:  # Kernels [in..., out...]; the attention output [N, H, D] reads N * H inputs.
      params[path] = noise / np.sqrt(np.prod(shape[:-1] if path.endswith("out/kernel")
                                             else shape[:1]))
  return paths.unflatten({p: x.astype(np.float32) for p, x in params.items()})


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
  """(name, module, params, folder, transformers model) of one tiny model, exported."""
  module = MODELS[request.param]()
  params = random_params(module, seed=len(request.param))
  folder = str(tmp_path_factory.mktemp(request.param))
  hf = to_hf(module, params, folder)
  auto = {"bert": transformers.AutoModel,
          "bert_classifier": transformers.AutoModelForSequenceClassification,
          "bert_mlm": transformers.AutoModelForMaskedLM}.get(request.param) or (
              transformers.AutoModelForSeq2SeqLM if request.param.startswith("t5")
              else transformers.AutoModelForCausalLM)
  model, info = auto.from_pretrained(folder, output_loading_info=True)
  assert type(model).__name__ == hf["architectures"][0]
  # BertModel has a pooler that EncoderOnly lacks: transformers initialises it.
  pooler = {"pooler.dense.weight", "pooler.dense.bias"} if request.param == "bert" else set()
  assert set(info["missing_keys"]) == pooler and not info["unexpected_keys"], info
  return request.param, module, params, folder, model.eval()


def _padded(seed: int, lengths):
  """tokens [B, T] (ids >= 3, padding 0) and a 0/1 attention mask with rows of these lengths."""
  T = max(lengths)
  mask = np.array([[1] * n + [0] * (T - n) for n in lengths])
  return np.random.RandomState(seed).randint(3, VOCAB, (len(lengths), T)) * mask, mask


def max_error(module, params, model) -> float:
  """max |ours - transformers'| over the valid positions of a padded batch."""
  apply = jax.jit(module.apply)
  tokens, mask = _padded(0, [12, 7, 3])
  with torch.no_grad():
    if isinstance(module, EncoderDecoder):
      decoder_tokens = np.random.RandomState(1).randint(0, VOCAB, (3, 9))
      reference = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                        decoder_input_ids=torch.tensor(decoder_tokens)).logits.numpy()
      ours = apply({"params": params}, tokens, decoder_tokens,
                   encoder_padding_mask=mask.astype(bool))
      mask = np.ones(decoder_tokens.shape)
    elif isinstance(module, DecoderOnly):  # Causal: right padding needs no mask.
      reference = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
      ours = apply({"params": params}, tokens)
    else:
      types = np.random.RandomState(2).randint(0, module.cfg.num_token_types, tokens.shape)
      out = model(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                  token_type_ids=torch.tensor(types))
      reference = out.last_hidden_state if isinstance(module, EncoderOnly) else out.logits
      reference = reference.numpy()
      ours = apply({"params": params}, tokens, padding_mask=mask.astype(bool), token_types=types)
      if isinstance(module, EncoderClassifier):
        mask = np.ones(reference.shape[:1])
  valid = mask.astype(bool)
  assert np.abs(reference[valid]).max() > 0.5  # Outputs not trivially small.
  return float(np.abs(np.asarray(ours) - reference)[valid].max())


def test_transformers_computes_the_exported_models_outputs(exported):
  name, module, params, _, model = exported
  error = max_error(module, params, model)
  assert error <= TOL, f"{name}: max |ours - transformers| = {error}"


def test_from_hf_reads_back_the_identical_params(exported):
  name, module, params, folder, _ = exported
  head = HEADS.get(type(module))
  imported, imported_params = pretrained.from_hf(
      folder, head=head, num_classes=getattr(module, "num_classes", None),
      scan_layers=module.cfg.scan_layers)
  assert type(imported) is type(module)
  ours, theirs = paths.flatten(params), paths.flatten(imported_params)
  assert ours.keys() == theirs.keys(), name
  for path, x in ours.items():
    np.testing.assert_array_equal(theirs[path], x, err_msg=f"{name}: {path}")


# ------------------------------------------------------------------------------------------
# What cannot be exported.


def _error(module, params=None, **kwargs) -> str:
  params = random_params(module, 0) if params is None else params
  with pytest.raises(PretrainedError) as info:
    to_hf(module, params, "/nonexistent/never/written", **kwargs)
  return str(info.value)


def test_a_model_its_family_cannot_compute_is_refused_with_the_fields():
  sinusoidal = DecoderOnly(presets.gpt2(vocab_size=VOCAB, d_model=24, num_heads=3, d_ff=40,
                                        num_layers=1, max_len=16, position="sinusoidal"))
  assert "gpt2 checkpoint" in _error(sinusoidal)
  assert "position='sinusoidal' (GPT2LMHeadModel has 'learned')" in _error(sinusoidal)
  windowed = DecoderOnly(presets.llama(**DECODER, sliding_window=4))
  assert "sliding_window=4 (LlamaForCausalLM has None)" in _error(windowed, model_type="llama")
  gated_bias = DecoderOnly(presets.gemma(**DECODER, ffn_bias=True))
  assert "ffn_bias=True (GemmaForCausalLM has False)" in _error(gated_bias)
  assert "pooling='mean'" in _error(EncoderClassifier(BERT, num_classes=2, pooling="mean"))
  assert "num_token_types=0" in _error(EncoderOnly(BERT.replace(num_token_types=0)))
  assert "cannot hold a DecoderOnly" in _error(windowed, model_type="t5")


def test_params_that_do_not_fit_the_model_are_refused():
  module = MODELS["gpt2_untied"]()
  params = random_params(module, 0)
  params["decoder"]["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
  del params["decoder"]["logits_dense"]
  message = _error(module, params)
  assert "missing decoder/logits_dense/kernel" in message
  assert "unexpected decoder/extra/kernel" in message


def test_rows_are_inverted_only_when_they_rearrange():
  flat = {"w": np.arange(6, dtype=np.float32).reshape(3, 2)}
  np.testing.assert_array_equal(
      hf_tensors([Row("w", "t", (2, 3), lambda x: x.T)], flat)["t"],
      [[0, 2, 4], [1, 3, 5]])
  fused = [Row("a", "t", (4,), lambda x: x[:2]), Row("b", "t", (4,), lambda x: x[2:][::-1])]
  np.testing.assert_array_equal(
      hf_tensors(fused, {"a": np.array([1., 2.]), "b": np.array([3., 4.])})["t"], [1, 2, 4, 3])
  for arithmetic in (lambda x: 2 * x, lambda x: x + 1, lambda x: x / 2, lambda x: -x):
    with pytest.raises(AssertionError, match="not a rearrangement"):
      hf_tensors([Row("w", "t", (3, 2), arithmetic)], flat)
  with pytest.raises(AssertionError, match="exactly once"):
    hf_tensors([Row("a", "t", (4,), lambda x: x[:2]), Row("b", "t", (4,), lambda x: x[1:3])],
               {"a": np.zeros(2), "b": np.zeros(2)})
  with pytest.raises(AssertionError, match="No table row reads"):
    hf_tensors([Row("w", "t", (3, 2))], {**flat, "v": np.zeros(2)})
