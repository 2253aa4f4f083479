"""models/pretrained_export.py: tapete models written as Hugging Face folders, read back by
transformers (PyTorch, CPU) and by from_hf.

One tiny model with random weights per family and head (module-scoped): transformers'
AutoModel* of the exported folder computes the same outputs (max |Δ| <= 1e-4, fp32, padded
batches), and from_hf of the folder gives back the identical params. Nothing is downloaded.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import sentencepiece

from experiments import finetune_gpt2
from models import paths, presets, pretrained
from models.pretrained_export import hf_tensors, to_hf
from models.pretrained_tables import PretrainedError, Row
from models.transformer import (DecoderOnly, EncoderClassifier, EncoderDecoder, EncoderMaskedLM,
                                EncoderOnly)
from train import export
from train.data.tokenizers import HFTokenizer, SentencePieceTokenizer
from train.engine import loop
from train.run import config as config_lib, export_tokenizer, run_tokenizers, workdir as workdir_lib

# The parity references; the file skips without them (CI's Python 3.12 run installs neither:
# torch 2.13.0 for 3.12 is a CUDA build of GBs).
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]

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
  if request.param == "bert":  # BertModel's pooler, carried as from_hf carries it.
    rng = np.random.RandomState(1)
    params["pooler"] = {"kernel": rng.standard_normal((32, 32)).astype(np.float32) / 6,
                        "bias": 0.2 * rng.standard_normal(32).astype(np.float32)}
  folder = str(tmp_path_factory.mktemp(request.param))
  hf = to_hf(module, params, folder)
  auto = {"bert": transformers.AutoModel,
          "bert_classifier": transformers.AutoModelForSequenceClassification,
          "bert_mlm": transformers.AutoModelForMaskedLM}.get(request.param) or (
              transformers.AutoModelForSeq2SeqLM if request.param.startswith("t5")
              else transformers.AutoModelForCausalLM)
  model, info = auto.from_pretrained(folder, output_loading_info=True)
  assert type(model).__name__ == hf["architectures"][0]
  # Every weight of the class is in the file: transformers initialises nothing anew.
  assert not info["missing_keys"] and not info["unexpected_keys"], info
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


def test_a_config_and_head_export_as_the_module_does(exported, tmp_path):
  _, module, params, folder, _ = exported
  to_hf(module.cfg, params, str(tmp_path), head=HEADS.get(type(module)))
  for name in ("config.json", "model.safetensors"):
    assert (tmp_path / name).read_bytes() == pathlib.Path(folder, name).read_bytes(), name


def test_a_bertmodel_keeps_its_pooler_through_import_and_export(tmp_path):
  """transformers' BertModel (random weights, a pooler) -> from_hf -> to_hf -> transformers: the
  pooler comes back, and so does its output (tanh of a dense layer on the first token)."""
  torch.manual_seed(0)
  original = transformers.BertModel(transformers.BertConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=48, max_position_embeddings=16)).eval()
  original.save_pretrained(tmp_path / "in")
  module, params = pretrained.from_hf(str(tmp_path / "in"))
  assert isinstance(module, EncoderOnly) and set(params["pooler"]) == {"kernel", "bias"}
  to_hf(module, params, str(tmp_path / "out"))
  model, info = transformers.AutoModel.from_pretrained(str(tmp_path / "out"),
                                                       output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  tokens, mask = _padded(3, [9, 5])
  with torch.no_grad():
    expected, got = (m(torch.tensor(tokens), attention_mask=torch.tensor(mask)).pooler_output
                     for m in (original, model.eval()))
  assert np.abs(expected.numpy()).max() > 0.01
  np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0, atol=1e-6)


def test_an_encoder_without_a_pooler_exports_and_a_partial_one_is_refused(tmp_path):
  """An EncoderOnly's params without a pooler (not imported from a BertModel) still export; a
  pooler cut in half is named, not written."""
  module = MODELS["bert"]()
  params = random_params(module, 0)
  to_hf(module, params, str(tmp_path))
  written = pretrained._read_tensors(str(tmp_path))
  assert not any(name.startswith("pooler.") for name in written) and written
  params["pooler"] = {"kernel": np.zeros((32, 32), np.float32)}
  assert "missing pooler/bias" in _error(module, params)


@pytest.mark.parametrize("model", [None, "gpt2", {"d_model": 32}])
def test_a_first_argument_that_is_no_model_is_a_type_error(model, tmp_path):
  with pytest.raises(TypeError, match="to_hf takes the module the params are for"):
    to_hf(model, random_params(MODELS["bert"](), 0), str(tmp_path / "out"))
  with pytest.raises(TypeError, match="to_hf takes the params as a nested dict"):
    to_hf(MODELS["bert"](), None, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


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


# ------------------------------------------------------------------------------------------
# python -m train.export over a LoRA fine-tuning run, and the tokenizers a run can use.


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """finetune_gpt2:tiny with LoRA adapters that moved far enough to change the logits."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("TAPETE_CACHE", str(tmp_path_factory.mktemp("cache")))
    config = config_lib.resolve_assets(finetune_gpt2.get_config("tiny"))
    config.lora.enabled = True
    config.optim.learning_rate = 3e-2
    workdir = tmp_path_factory.mktemp("lora_gpt2")
    loop.train_and_evaluate(config, str(workdir))
    yield str(workdir)


def _export_cli(*args: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "train.export", *args], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_the_cli_exports_a_lora_run_that_transformers_loads(lora_run, tmp_path):
  out, taken = tmp_path / "export", tmp_path / "taken"
  taken.mkdir()
  (taken / "notes.txt").write_text("mine")
  exporting = _export_cli(f"--workdir={lora_run}", f"--out={out}")
  refusing = _export_cli(f"--workdir={lora_run}", f"--out={taken}")
  stdout, stderr = exporting.communicate(timeout=300)
  assert exporting.returncode == 0, stderr
  assert "a gpt2 checkpoint (GPT2LMHeadModel) and the run's pretrained tokenizer" in stdout
  _, stderr = refusing.communicate(timeout=300)
  assert refusing.returncode == 2 and "Traceback" not in stderr, stderr
  assert stderr.splitlines()[-1] == (f"error: --out={taken} is a folder that holds files and no "
                                     "readable export.json of an earlier export: give a new or "
                                     "empty folder.")

  run = workdir_lib.load(lora_run)
  texts = ["To be, or not", "A horse! a horse!", "Now is the winter of our discontent"]
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  ids = [run.input_tokenizer.encode(text) for text in texts]
  assert ids == [hf_tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
  lengths = [len(row) for row in ids]
  mask = np.array([[i < n for i in range(max(lengths))] for n in lengths])
  tokens = np.array([row + [0] * (max(lengths) - len(row)) for row in ids])
  model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  with torch.no_grad():
    reference = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
  ours = np.asarray(jax.jit(run.model.apply)({"params": run.params}, tokens))
  assert np.abs(ours - reference)[mask].max() <= TOL
  _, base = pretrained.from_hf(run.config.init_from[len("hf:"):])
  unadapted = np.asarray(jax.jit(run.model.apply)({"params": base}, tokens))
  assert np.abs(unadapted - reference)[mask].max() > 100 * TOL  # The adapters are merged in.

  (out / "notes.txt").write_text("mine")
  (out / "tokenizer.json").unlink()
  assert export.export(lora_run, str(out)).startswith(f"Wrote {out}")  # An earlier export.
  listed = json.loads((out / "export.json").read_text())["files"]
  assert "tokenizer.json" in listed
  assert sorted(os.listdir(out)) == sorted([*listed, "export.json", "notes.txt"])


TEXTS = ["Hello world, ação e reação!", "naïve Café — 東京 😀 12345\tend", "UPPER lower MiXeD"]


@pytest.mark.parametrize("kind", ["bytes", "word", "char", "sentencepiece"])
def test_our_tokenizers_export_with_their_ids(kind, tmp_path):
  config = config_lib.base_config()
  config.data.tokenizer = kind
  corpus = (ROOT / "experiments" / "data" / "tiny_corpus.txt").read_text().splitlines()
  if kind == "sentencepiece":
    config.data.tokenizer_path, config.data.vocab_size = str(tmp_path / "sp.model"), 200
    SentencePieceTokenizer.train_or_load(config.data.tokenizer_path, lambda: corpus, 200)
  elif kind != "bytes":
    config.data.tokenizer_path = str(tmp_path / "vocab.json")
    HFTokenizer.train_or_load(config.data.tokenizer_path, lambda: TEXTS * 2, level=kind)
  tokenizer = run_tokenizers.make_tokenizers(config.data, config.task, config.init_from,
                                             str(tmp_path))[0]
  folder = tmp_path / "export"
  folder.mkdir()
  for name, data in export_tokenizer.tokenizer_files(config.data, config.init_from,
                                                     str(tmp_path), tokenizer).items():
    (folder / name).write_bytes(data)
  reference = transformers.AutoTokenizer.from_pretrained(str(folder))
  for text in TEXTS + corpus[:50] + ["  two  spaces\tand a tab  ", "Ｆｕｌｌ width ①"]:
    ids = tokenizer.encode(text)
    assert reference(text, add_special_tokens=False)["input_ids"] == ids, text
    if tokenizer.unk_id not in ids:  # SentencePiece decodes an unknown piece as " ⁇ ".
      assert reference.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids), text
  for name in ("pad", "bos", "eos", "unk", "mask"):
    assert getattr(reference, f"{name}_token_id") == getattr(tokenizer, f"{name}_id"), name


def test_a_bpe_sentencepiece_model_is_not_written(tmp_path):
  config = config_lib.base_config()
  config.data.tokenizer, config.data.tokenizer_path = "sentencepiece", str(tmp_path / "sp.model")
  config.data.vocab_size = 60
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(TEXTS * 5), model_prefix=str(tmp_path / "sp"), vocab_size=60,
      model_type="bpe", pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2)
  tokenizer = run_tokenizers.make_tokenizers(config.data, config.task, config.init_from,
                                             str(tmp_path))[0]
  with pytest.raises(export_tokenizer.NotWritten, match=r"only unigram models"):
    export_tokenizer.tokenizer_files(config.data, config.init_from, str(tmp_path), tokenizer)
