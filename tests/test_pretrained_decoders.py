"""models/pretrained.py's LLaMA-style decoders (llama, mistral, qwen2, gemma) against transformers.

One tiny transformers model with random weights per family (module-scoped), saved with
save_pretrained: logits of padded batches within 1e-4 (fp32), cached decoding equal to the full
forward, greedy generation token-identical to transformers' `generate` (stopping at a list of
EOS ids), bf16 checkpoints loaded exactly; the families' tokenizer folders against
AutoTokenizer. Nothing is downloaded.
"""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from safetensors.numpy import load_file, save_file

from models import decoding, presets, pretrained
from models.transformer import DecoderOnly
from train.assets.tiny_hf import BYTES, bpe
from train.data.examples import bos_eos
from train.data.tokenizers import TokenizerError, tokenizer_for
from train.run import config as config_lib, validation, workdir as workdir_lib

# The parity references; the file skips without them (CI's Python 3.12 run installs neither:
# torch 2.13.0 for 3.12 is a CUDA build of GBs).
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 61
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
# head_dim 8, base 500: wavelengths 6.3 (kept: < 16 / 2), 30 (interpolated) and 140, 664
# (stretched: > 16 / 0.5).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 0.5,
               "high_freq_factor": 2.0, "original_max_position_embeddings": 16}
CONFIGS = {
    # Grouped-query; llama3 RoPE scaling; biases on the attention projections, none in the MLP;
    # an output layer of its own.
    "llama": lambda: transformers.LlamaConfig(**SIZES, attention_bias=True,
                                              rope_parameters=LLAMA3_ROPE),
    # Tied output, biases in the MLP only, another RoPE base.
    "llama_tied": lambda: transformers.LlamaConfig(
        **SIZES, tie_word_embeddings=True, mlp_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    # A window of 4 keys: shorter than the prompts and the generations.
    "mistral": lambda: transformers.MistralConfig(**SIZES, sliding_window=4),
    # Biases on query, key and value; tied output (as Qwen2-0.5B).
    "qwen2": lambda: transformers.Qwen2Config(**SIZES, tie_word_embeddings=True),
    # One key/value head and head_dim 12 (not 32 / 4); tied output.
    "gemma": lambda: transformers.GemmaConfig(**{**SIZES, "num_key_value_heads": 1}, head_dim=12),
}


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Weights large enough that every tensor matters: a mapping bug shows in the logits."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if "norm" in name:  # LLaMA's scale is w, Gemma's 1 + w: both far from 1 and from 0.
        p.copy_(0.5 + 0.2 * noise)
      elif p.ndim == 1:
        p.copy_(0.2 * noise)
      elif "embed" in name:  # Gemma scales its inputs by √d: entries / √d, as large as others'.
        p.copy_(noise / np.sqrt(p.shape[1]) if "gemma" in type(model).__name__.lower() else noise)
      else:
        p.copy_(noise / np.sqrt(min(p.shape)))
  return model.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
  """(family, transformers model, folder, module, params) of one tiny random checkpoint."""
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param]())
  _randomize(model, seed=len(request.param))
  folder = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(folder)
  module, params = pretrained.from_hf(folder)
  return request.param, model, folder, module, params


def _padded(seed: int, lengths, left: bool = False):
  """tokens [B, T] (ids >= 3, padding 0) and a 0/1 attention mask with rows of these lengths."""
  T = max(lengths)
  mask = np.array([[1] * n + [0] * (T - n) for n in lengths])
  mask = mask[:, ::-1].copy() if left else mask
  return np.random.RandomState(seed).randint(3, VOCAB, (len(lengths), T)) * mask, mask


def _max_error(ours, reference, mask) -> float:
  valid = mask.astype(bool)
  assert np.abs(reference[valid]).max() > 0.5  # Logits not trivially small.
  return float(np.abs(np.asarray(ours) - reference)[valid].max())


def _hf_logits(model, tokens, mask, positions=None):
  with torch.no_grad():
    return model(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 position_ids=None if positions is None else torch.tensor(positions)
                 ).logits.numpy()


def test_logits_match_transformers(checkpoint):
  family, model, folder, module, params = checkpoint
  assert isinstance(module, DecoderOnly) and pretrained.hf_config(folder) == module.cfg
  assert module.cfg.tie_output == (family in ("llama_tied", "qwen2", "gemma"))
  apply = jax.jit(module.apply)

  tokens, mask = _padded(0, [12, 7, 3])  # Right padding: causal, so nothing to mask.
  error = _max_error(apply({"params": params}, tokens), _hf_logits(model, tokens, mask), mask)
  assert error <= TOL, f"{family}: max |logits - transformers| = {error}"

  tokens, mask = _padded(1, [12, 5], left=True)  # Left padding: segment ids and positions.
  positions = np.maximum(mask.cumsum(1) - 1, 0)
  ours = apply({"params": params}, tokens, segment_ids=mask)
  error = _max_error(ours, _hf_logits(model, tokens, mask, positions), mask)
  assert error <= TOL, f"{family}, left-padded: max |logits - transformers| = {error}"


def test_cached_decoding_equals_the_full_forward(checkpoint):
  family, model, _, module, params = checkpoint
  tokens, mask = _padded(2, [11, 11])
  full = np.asarray(jax.jit(module.apply)({"params": params}, tokens))
  reference = _hf_logits(model, tokens, mask)

  @jax.jit
  def step(cache, chunk):
    logits, variables = module.apply({"params": params, "cache": cache}, chunk, decode=True,
                                     mutable=["cache"])
    return logits, variables["cache"]

  cache = jax.jit(lambda: module.init(jax.random.key(0), jnp.zeros_like(tokens),
                                      decode=True)["cache"])()
  logits, cache = step(cache, tokens[:, :5])  # Prefill 5, then one token at a time.
  chunks = [logits]
  for t in range(5, 11):
    logits, cache = step(cache, tokens[:, t:t + 1])
    chunks.append(logits)
  cached = np.concatenate(chunks, axis=1)
  np.testing.assert_allclose(cached, full, atol=1e-5, rtol=0, err_msg=family)
  assert _max_error(cached, reference, mask) <= TOL


def test_greedy_generation_matches_transformers(checkpoint):
  """Prompts of different lengths; EOS ids chosen among the tokens generated, so rows stop."""
  family, model, _, module, params = checkpoint
  prompts = [list(row[:n]) for row, n in zip(_padded(3, [9, 4, 6])[0], [9, 4, 6])]
  new = 10
  batch = np.array([row + [0] * (9 - len(row)) for row in prompts])  # Right-padded for us.
  lengths = np.array([len(row) for row in prompts])
  no_eos = decoding.generate_decoder_only(module, params, batch, lengths,
                                          decoding.Search(max_new_tokens=new, pad_id=0))
  eos_ids = (int(no_eos.tokens_BN[0, 3]), int(no_eos.tokens_BN[2, 6]))
  search = decoding.Search(max_new_tokens=new, eos_id=eos_ids, pad_id=0)
  ours = decoding.generate_decoder_only(module, params, batch, lengths, search)
  assert int(ours.lengths_B.min()) < new  # The EOS list ended at least one row early.

  left = np.array([[0] * (9 - len(row)) + row for row in prompts])  # Left-padded for them.
  with torch.no_grad():
    theirs = model.generate(torch.tensor(left), attention_mask=torch.tensor(left != 0),
                            max_new_tokens=new, do_sample=False, num_beams=1,
                            eos_token_id=list(eos_ids), pad_token_id=0).numpy()[:, 9:]
  theirs = np.pad(theirs, [(0, 0), (0, new - theirs.shape[1])])  # transformers stops early.
  np.testing.assert_array_equal(ours.tokens_BN, theirs, err_msg=family)


def test_bf16_checkpoints_load_exactly(checkpoint, tmp_path):
  family, model, _, _, params = checkpoint
  copy.deepcopy(model).to(torch.bfloat16).save_pretrained(str(tmp_path))
  with open(tmp_path / "model.safetensors", "rb") as f:
    assert b'"BF16"' in f.read(400)
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(np.float32), params)
  _, loaded = pretrained.from_hf(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, loaded, rounded)
  _, kept = pretrained.from_hf(str(tmp_path), param_dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(kept)} == {jnp.dtype(jnp.bfloat16)}, family
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.astype(np.float32), b), kept, rounded)


def test_the_lm_task_fine_tunes_every_family(checkpoint):
  family, _, folder, _, _ = checkpoint
  config = config_lib.base_config()
  config.init_from = f"hf:{folder}"
  validation.validate(config)
  config.task, config.model.num_classes = "classify", 2
  with pytest.raises(ValueError, match=f"is a {family.split('_')[0]} checkpoint; task "
                                       "'classify' fine-tunes bert"):
    validation.validate(config)


# ------------------------------------------------------------------------------------------
# Presets: the published sizes.


@pytest.mark.parametrize("name, count", [("llama3", 8_030_261_248), ("mistral", 7_241_732_096),
                                         ("qwen2", 7_615_616_512), ("gemma", 8_537_680_896)])
def test_presets_have_the_published_sizes(name, count):
  """LLaMA 3.1 8B, Mistral 7B v0.1, Qwen2 7B and Gemma 7B as their model cards count them."""
  shapes = jax.eval_shape(DecoderOnly(presets.PRESETS[name]()).init, jax.random.key(0),
                          jnp.ones((1, 8), jnp.int32))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == count


# ------------------------------------------------------------------------------------------
# Errors.


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
  config = transformers.LlamaConfig(**{**SIZES, "num_hidden_layers": 1})
  folder = str(tmp_path_factory.mktemp("llama_small"))
  transformers.LlamaForCausalLM(config).save_pretrained(folder)
  return folder


def _copy(folder, to, config_changes=None, tensors=None, drop=()):
  os.makedirs(to)
  with open(os.path.join(folder, "config.json")) as f:
    config = {**json.load(f), **(config_changes or {})}
  with open(os.path.join(to, "config.json"), "w") as f:
    json.dump(config, f)
  weights = {**load_file(os.path.join(folder, "model.safetensors")), **(tensors or {})}
  save_file({k: v for k, v in weights.items() if k not in drop},
            os.path.join(to, "model.safetensors"))
  return str(to)


def test_buffers_are_skipped_and_unknown_tensors_are_errors(tmp_path, llama_folder):
  def error(path):
    with pytest.raises(pretrained.PretrainedError) as info:
      pretrained.from_hf(path)
    return str(info.value)

  _, params = pretrained.from_hf(llama_folder)
  inv_freq = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}
  _, with_buffer = pretrained.from_hf(_copy(llama_folder, tmp_path / "buffer", tensors=inv_freq))
  jax.tree.map(np.testing.assert_array_equal, with_buffer, params)
  folder = _copy(llama_folder, tmp_path / "extra",
                 tensors={"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)})
  assert "layers.0.self_attn.q_norm.weight" in error(folder) and "does not use" in error(folder)
  folder = _copy(llama_folder, tmp_path / "no_head", drop=("lm_head.weight",))
  assert "missing" in error(folder) and "lm_head.weight" in error(folder)
  folder = _copy(llama_folder, tmp_path / "biased", {"attention_bias": True})
  assert "layers.0.self_attn.q_proj.bias" in error(folder)
  folder = _copy(llama_folder, tmp_path / "yarn",
                 {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})
  assert "RoPE type 'yarn'" in error(folder)
  folder = _copy(llama_folder, tmp_path / "qwen2", {"model_type": "qwen2",
                                                   "use_sliding_window": True})
  assert "use_sliding_window" in error(folder)
  folder = _copy(llama_folder, tmp_path / "gemma", {"model_type": "gemma",
                                                   "use_bidirectional_attention": True})
  assert "use_bidirectional_attention=True" in error(folder)
  folder = _copy(llama_folder, tmp_path / "mixtral", {"model_type": "mixtral"})
  assert "model_type 'mixtral'" in error(folder) and "llama" in error(folder)


# ------------------------------------------------------------------------------------------
# Tokenizer folders as transformers saves them: byte-fallback BPE (LLaMA, Mistral, Gemma) and
# byte-level BPE (Qwen2), trained here on a few texts; the other texts fall back to bytes.

TEXTS = ["Hello world, ação e reação!", "The quick brown fox jumps over the lazy dog.",
         "naïve Café — 東京 😀 12345", "UPPER lower MiXeD  spaces"]


def _tokenizer_folders(root):
  """{family: folder} of tokenizers saved by transformers (Qwen2 with a generation_config.json)."""
  folders = {}
  specials = ["<unk>", "<|begin_of_text|>", "<|eot_id|>"]  # LLaMA 3's names, not <s> and </s>.
  vocab, merges = bpe(tokenizers.pre_tokenizers.Metaspace(), 120, [*specials, *BYTES],
                     TEXTS[:2])
  llama = transformers.LlamaTokenizer(vocab=vocab, merges=merges, bos_token=specials[1],
                                      eos_token=specials[2], add_bos_token=True)
  vocab, merges = bpe(tokenizers.pre_tokenizers.Metaspace(prepend_scheme="never"), 120,
                      ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *BYTES], TEXTS[:2])
  gemma = transformers.GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
  vocab, merges = bpe(tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False), 300, [],
                      TEXTS)
  vocab.update({"<|endoftext|>": len(vocab), "<|im_end|>": len(vocab) + 1})
  qwen2 = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>")
  for name, tokenizer in (("llama", llama), ("gemma", gemma), ("qwen2", qwen2)):
    folders[name] = str(root / name)
    tokenizer.save_pretrained(folders[name])
  stop = [vocab["<|im_end|>"], vocab["<|endoftext|>"]]  # As Qwen2-Instruct's generation config.
  transformers.GenerationConfig(eos_token_id=stop).save_pretrained(folders["qwen2"])
  return folders


def test_tokenizer_folders_match_auto_tokenizer(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  folders = _tokenizer_folders(tmp_path)
  for family, folder in folders.items():
    ours, reference = tokenizer_for(folder), transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
      ids = ours.encode(text)
      assert ids == reference(text, add_special_tokens=False)["input_ids"], (family, text)
      with_specials = reference(text)["input_ids"]
      if family == "qwen2":  # No BOS: the lm pipelines start with the EOS, as for GPT-2.
        assert ours.bos_id is None and with_specials == ids
      else:
        assert with_specials == [bos_eos(ours)[0]] + ids
      assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    if family != "qwen2":  # 東 is not in the vocabulary: its UTF-8 bytes are.
      assert "<0xE6>" in reference.convert_ids_to_tokens(ours.encode(TEXTS[2]))
    assert ours.eos_id == reference.eos_token_id and ours.vocab_size == len(reference)
    expected_stop = (ours.eos_id, reference.convert_tokens_to_ids("<|endoftext|>"))
    assert ours.stop_ids == (expected_stop if family == "qwen2" else (ours.eos_id,))

  qwen2 = tokenizer_for(folders["qwen2"])  # train.generate and the evals stop at its list.
  base = config_lib.base_config()
  assert workdir_lib.decoding_search(base.decode, base.task, base.data.targets_len,
                                     qwen2).eos_id == qwen2.stop_ids
  assert len(qwen2.stop_ids) == 2

  with open(os.path.join(folders["qwen2"], "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": ["<|im_end|>"]}, f)
  with pytest.raises(TokenizerError, match="generation_config.json has eos_token_id=.*list of ids"):
    tokenizer_for(folders["qwen2"])
