"""train.config.validate: every bad value refused with one sentence, before any data or compile."""

import pytest

from experiments import gpt2_small
from train import config as config_lib


def seq2seq_config(**data):
  """A small seq2seq config with a learned position table of 32."""
  c = config_lib.base_config()
  c.task = "seq2seq"
  c.model.update(d_model=32, num_heads=4, d_ff=64, num_layers=1, position="learned", max_len=32)
  c.data.update(data)
  return c


# ------------------------------------------------------------------------------------------
# Lengths against a learned position table.


def test_seq_len_over_the_tiny_gpt2_table_is_refused():
  c = gpt2_small.get_config("tiny")  # gpt2 preset (learned positions), max_len 128
  c.data.seq_len = 128
  config_lib.validate(c)
  c.data.seq_len = 129
  with pytest.raises(ValueError, match=r"^config\.data\.seq_len=129 exceeds the model's learned "
                     r"position table \(model\.max_len=128\): lower data\.seq_len to at most 128 "
                     r"or raise model\.max_len\.$"):
    config_lib.validate(c)


def test_the_gpt2_presets_table_is_1024():
  c = gpt2_small.get_config()
  c.data.seq_len = 2048
  with pytest.raises(ValueError, match=r"model\.max_len=1024"):
    config_lib.validate(c)


@pytest.mark.parametrize("name, value", [
    ("data.inputs_len", 33), ("data.targets_len", 33), ("decode.max_new_tokens", 40)])
def test_seq2seq_checks_the_encoder_and_decoder_lengths(name, value):
  c = seq2seq_config(inputs_len=32, targets_len=32)
  c.decode.max_new_tokens = 32
  config_lib.validate(c)
  section, key = name.split(".")
  c[section][key] = value
  with pytest.raises(ValueError, match=rf"config\.{name}={value} exceeds .*max_len=32"):
    config_lib.validate(c)


def test_positions_that_are_not_learned_have_no_table():
  c = seq2seq_config(inputs_len=4096, targets_len=4096)
  c.model.position = "sinusoidal"
  config_lib.validate(c)


@pytest.fixture
def hf_folder(tmp_path):
  """Writes a transformers config.json (no weights: validate does not read them)."""
  transformers = pytest.importorskip("transformers")

  def write(hf_config):
    folder = tmp_path / hf_config.model_type
    hf_config.save_pretrained(folder)
    return str(folder)
  return write, transformers


@pytest.mark.parametrize("task, family", [("lm", "gpt2"), ("classify", "bert"),
                                          ("mlm", "bert")])
def test_a_pretrained_table_comes_from_its_config_json(task, family, hf_folder):
  write, transformers = hf_folder
  if family == "gpt2":
    hf = transformers.GPT2Config(n_positions=48, n_embd=32, n_layer=1, n_head=4)
  else:
    hf = transformers.BertConfig(max_position_embeddings=48, hidden_size=32,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=64)
  c = config_lib.base_config()
  c.task, c.init_from, c.model.num_classes = task, f"hf:{write(hf)}", 2
  c.data.seq_len = 48
  config_lib.validate(c)
  c.data.seq_len = 49
  with pytest.raises(ValueError, match=r"config\.data\.seq_len=49 exceeds the model's learned "
                     r"position table \(max_len=48 in hf:.*'s config\.json\): lower data\.seq_len "
                     r"to at most 48 \(a pretrained model's table cannot grow\)\.$"):
    config_lib.validate(c)


def test_t5_positions_are_relative(hf_folder):
  write, transformers = hf_folder
  hf = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
  c = seq2seq_config(inputs_len=4096, targets_len=4096)
  c.model.update(d_model=None, num_heads=None, d_ff=None, num_layers=None, position=None,
                 max_len=None)
  c.init_from = f"hf:{write(hf)}"
  config_lib.validate(c)
