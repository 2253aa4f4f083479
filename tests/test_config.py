"""train.run.validation.validate: every bad value refused with one sentence, before any data or
compile."""

import pytest

from experiments import gpt2_small
from train.run import config as config_lib, validation


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
  validation.validate(c)
  c.data.seq_len = 129
  with pytest.raises(ValueError, match=r"^config\.data\.seq_len=129 exceeds the model's learned "
                     r"position table \(model\.max_len=128\): lower data\.seq_len to at most 128 "
                     r"or raise model\.max_len\.$"):
    validation.validate(c)


def test_the_gpt2_presets_table_is_1024():
  c = gpt2_small.get_config()
  c.data.seq_len = 2048
  with pytest.raises(ValueError, match=r"model\.max_len=1024"):
    validation.validate(c)


@pytest.mark.parametrize("name, value", [
    ("data.inputs_len", 33), ("data.targets_len", 33), ("decode.max_new_tokens", 40)])
def test_seq2seq_checks_the_encoder_and_decoder_lengths(name, value):
  c = seq2seq_config(inputs_len=32, targets_len=32)
  c.decode.max_new_tokens = 32
  validation.validate(c)
  section, key = name.split(".")
  c[section][key] = value
  with pytest.raises(ValueError, match=rf"config\.{name}={value} exceeds .*max_len=32"):
    validation.validate(c)


def test_positions_that_are_not_learned_have_no_table():
  c = seq2seq_config(inputs_len=4096, targets_len=4096)
  c.model.position = "sinusoidal"
  validation.validate(c)


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
  validation.validate(c)
  c.data.seq_len = 49
  with pytest.raises(ValueError, match=r"config\.data\.seq_len=49 exceeds the model's learned "
                     r"position table \(max_len=48 in hf:.*'s config\.json\): lower data\.seq_len "
                     r"to at most 48 \(a pretrained model's table cannot grow\)\.$"):
    validation.validate(c)


def test_t5_positions_are_relative(hf_folder):
  write, transformers = hf_folder
  hf = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
  c = seq2seq_config(inputs_len=4096, targets_len=4096)
  c.model.update(d_model=None, num_heads=None, d_ff=None, num_layers=None, position=None,
                 max_len=None)
  c.init_from = f"hf:{write(hf)}"
  validation.validate(c)


# ------------------------------------------------------------------------------------------
# Numbers: each out-of-range or non-finite value named with its allowed range.

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("key, value, message", [
    ("optim.learning_rate", NAN, r"learning_rate must be a number >= 0 and finite, got nan"),
    ("optim.learning_rate", INF, r"learning_rate must be a number >= 0 and finite, got inf"),
    ("optim.end_learning_rate_factor", INF, r"end_learning_rate_factor must be a number >= 0"),
    ("optim.weight_decay", NAN, r"weight_decay must be a number >= 0 and finite"),
    ("optim.eps", INF, r"eps must be a number >= 0 and finite"),
    ("optim.b1", NAN, r"b1 must be in \[0, 1\), got nan"),
    ("optim.b2", INF, r"b2 must be in \[0, 1\), got inf"),
    ("optim.momentum", NAN, r"momentum must be in \[0, 1\)"),
    ("optim.clip_norm", INF, r"clip_norm must be >= 0 and finite .*got inf"),
    ("optim.clip_norm", NAN, r"clip_norm must be >= 0 and finite .*got nan"),
    ("label_smoothing", NAN, r"config\.label_smoothing must be a finite number in \[0, 1\)"),
    ("label_smoothing", 1.0, r"config\.label_smoothing must be a finite number in \[0, 1\)"),
    ("model.dropout_rate", NAN, r"dropout_rate must be in \[0, 1\), got nan"),
    ("model.attention_dropout_rate", 1.0, r"attention_dropout_rate must be in \[0, 1\)"),
    ("model.norm_epsilon", NAN, r"config\.model\.norm_epsilon=nan is not a finite number"),
    ("data.mask_rate", 0.0, r"config\.data\.mask_rate must be a finite number in \(0, 1\)"),
    ("data.mask_rate", 1.0, r"config\.data\.mask_rate must be a finite number in \(0, 1\)"),
    ("data.mask_rate", NAN, r"config\.data\.mask_rate must be a finite number in \(0, 1\)"),
    ("data.seq_len", 0, r"config\.data\.seq_len must be positive, got 0"),
    ("data.inputs_len", -3, r"config\.data\.inputs_len must be positive, got -3"),
    ("data.targets_len", 0, r"config\.data\.targets_len must be positive"),
    ("data.tokenizer_train_examples", 0, r"config\.data\.tokenizer_train_examples must be pos"),
    ("data.vocab_size", -1, r"config\.data\.vocab_size must be >= 0, got -1"),
    ("data.num_workers", -1, r"config\.data\.num_workers must be >= 0"),
    ("decode.beam_size", 0, r"config\.decode\.beam_size must be positive, got 0"),
    ("decode.top_p", 1.5, r"config\.decode\.top_p must be a finite number in \[0, 1\]"),
    ("decode.top_p", NAN, r"config\.decode\.top_p must be a finite number in \[0, 1\]"),
    ("decode.top_k", -1, r"config\.decode\.top_k must be >= 0, got -1"),
    ("decode.temperature", NAN, r"config\.decode\.temperature must be a finite number >= 0"),
    ("decode.temperature", -1.0, r"config\.decode\.temperature must be a finite number >= 0"),
    ("decode.length_penalty_alpha", INF,
     r"config\.decode\.length_penalty_alpha must be a finite number, got inf"),
    ("decode.max_new_tokens", -1, r"config\.decode\.max_new_tokens must be >= 0"),
    ("train.num_steps", 0, r"config\.train\.num_steps must be positive, got 0"),
    ("train.eval_every", -1, r"config\.train\.eval_every must be >= 0"),
    ("train.print_examples", -1, r"config\.train\.print_examples must be >= 0"),
    ("train.peak_flops", NAN, r"config\.train\.peak_flops must be a finite number >= 0"),
    ("train.peak_flops", -1.0, r"config\.train\.peak_flops must be a finite number >= 0"),
    ("mesh.data", 0, r"config\.mesh\.data must be a positive integer or -1"),
    ("mesh.fsdp", -2, r"config\.mesh\.fsdp must be a positive integer or -1"),
    ("mesh.tensor", -1, r"config\.mesh sets 2 axes to -1"),
])
def test_a_bad_number_is_refused_with_its_range(key, value, message):
  c = gpt2_small.get_config("tiny")
  section, _, name = key.rpartition(".")
  (c[section] if section else c)[name] = value
  with pytest.raises(ValueError, match=message):
    validation.validate(c)


@pytest.mark.parametrize("alpha", [NAN, INF])
def test_a_lora_alpha_must_be_finite(alpha):
  c = gpt2_small.get_config("tiny")
  c.lora.enabled, c.lora.alpha = True, alpha
  with pytest.raises(ValueError, match=rf"LoRA config: alpha must be a finite number > 0, "
                     rf"got {alpha}\.$"):
    validation.validate(c)


def test_sampling_needs_a_positive_temperature():
  c = gpt2_small.get_config("tiny")
  c.decode.method, c.decode.temperature = "greedy", 0.0
  validation.validate(c)
  c.decode.method = "sample"
  with pytest.raises(ValueError, match=r"config\.decode\.temperature=0 with decode\.method="
                     r"'sample': give a temperature > 0"):
    validation.validate(c)


def test_a_pretrained_models_overrides_are_checked_before_its_weights_are_read(hf_folder):
  write, transformers = hf_folder
  c = config_lib.base_config()
  c.init_from = "hf:" + write(transformers.GPT2Config(n_positions=48, n_embd=32, n_layer=1,
                                                      n_head=4))
  c.data.seq_len, c.model.dropout_rate = 48, NAN
  with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\), got nan"):
    validation.validate(c)
