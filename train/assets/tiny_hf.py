"""Tiny random Hugging Face checkpoints: gpt2, t5, bert and llama, for tests and tiny variants.

Randomly initialised `transformers` models (seeded, width 32, 2 layers; the `pretrained`
extra) saved with save_pretrained, with a byte-level tokenizer.json of 256 bytes and the
family's special tokens; llama's is a byte-fallback BPE (as LLaMA-2's, Mistral's) saved by
transformers' LlamaTokenizer, trained on a few sentences, with the BOS its template adds.
"""

import pathlib

from models.errors import InputError
from train.assets import cache

PACKAGES = ("torch", "transformers", "tokenizers")

SPECIALS = {"gpt2": ["<|endoftext|>"], "t5": ["<pad>", "</s>", "<unk>"],
            "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            "llama": ["<unk>", "<s>", "</s>"]}
BYTES = [f"<0x{i:02X}>" for i in range(256)]  # Byte fallback's pieces.
LLAMA_TEXTS = ("What is the capital of France? The capital of France is Paris.",
               "Question: which colour is the sky? Answer: the sky is blue.",
               "The quick brown fox jumps over the lazy dog, and the dog sleeps.")


def byte_tokenizer(specials: list[str]):
  """A byte-level BPE tokenizer without merges: the specials first, then the 256 bytes."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {token: i for i, token in enumerate(specials + alphabet)}
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens(specials)
  return tokenizer


def bpe(pre_tokenizer, vocab_size: int, specials: list[str], texts) -> tuple[dict, list]:
  """(vocab, merges) of a BPE trained with the `tokenizers` library on `texts`; specials first."""
  import json
  import tokenizers
  trained = tokenizers.Tokenizer(tokenizers.models.BPE())
  trained.pre_tokenizer = pre_tokenizer
  trained.train_from_iterator(list(texts) * 3, tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, show_progress=False))
  model = json.loads(trained.to_str())["model"]
  pieces = specials + [p for p in model["vocab"] if p not in specials]
  return {p: i for i, p in enumerate(pieces)}, [tuple(m) for m in model["merges"]]


def llama_tokenizer():
  """LLaMA-2's kind of tokenizer: <unk> <s> </s>, the 256 byte pieces, then BPE pieces over a
  Metaspace (U+2581 for spaces, one before the text); BOS added to each text."""
  import tokenizers
  import transformers
  vocab, merges = bpe(tokenizers.pre_tokenizers.Metaspace(), 400,
                      [*SPECIALS["llama"], *BYTES], LLAMA_TEXTS)
  return transformers.LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def _tiny_model(family: str, vocab_size: int):
  import torch
  import transformers
  torch.manual_seed(0)
  if family == "gpt2":
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)
  if family == "t5":
    config = transformers.T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config)
  if family == "llama":
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config)
  config = transformers.BertConfig(
      vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=128)
  return transformers.BertModel(config)


def _write(folder: pathlib.Path, *, family: str):
  if family == "llama":
    tokenizer = llama_tokenizer()
    _tiny_model(family, len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return
  tokenizer = byte_tokenizer(SPECIALS[family])
  _tiny_model(family, tokenizer.get_vocab_size()).save_pretrained(folder)
  tokenizer.save(str(folder / "tokenizer.json"))


def folder(family: str) -> str:
  """The folder of a tiny random `family` (gpt2, t5, bert, llama) checkpoint, built once."""
  if family not in SPECIALS:
    raise InputError(f"No tiny {family!r} checkpoint: choose from {sorted(SPECIALS)}.")
  versions = cache.package_versions(
      *PACKAGES, hint="the tiny checkpoints need the `pretrained` extra: pip install -e "
      "'.[pretrained]'.")
  return cache.build_once(f"tiny_{family}", _write, inputs=versions, family=family)
