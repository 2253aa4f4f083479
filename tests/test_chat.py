"""train/data/chat.py: conversations through a folder's chat template, learned on the assistant.

References: transformers' apply_chat_template (token ids and, for templates with
`{% generation %}` markers, its assistant mask) on tiny folders it saves, with templates written
in the LLaMA-3, Qwen2 and Gemma styles; for a template without markers, its rendered text split
at the assistant headers with a regular expression.
"""

import json
import re

import numpy as np
import pytest

from models.errors import InputError
from train.data import chat, examples, local, pipeline
from train.data.tokenizers import tokenizer_for
from train.run import config, validation, workdir

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Qual é a capital de Portugal?"},
     {"role": "assistant", "content": "Lisboa."},
     {"role": "user", "content": "E do Brasil?"},
     {"role": "assistant", "content": "Brasília, desde 1960."}],
    [{"role": "user", "content": "Two plus two?"},
     {"role": "assistant", "content": "  Four.  "},
     {"role": "user", "content": "Times three?"},
     {"role": "assistant", "content": "Twelve."}],
]

LLAMA3 = (  # Meta's Llama-3 template, with the assistant turn in generation markers.
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
LLAMA3_PLAIN = (  # Meta's Llama-3-Instruct template as published: no markers.
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
QWEN2 = (  # Qwen2-Instruct's template, with the assistant turn in generation markers.
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA = (  # Gemma-IT's template (no system role), with the model turn in generation markers.
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' }}{% if role == 'model' %}{% generation %}"
    "{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] | trim + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
FAMILIES = {  # template, specials (bos, eos first), the conversations it takes
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eot_id|>"], CONVERSATIONS),
    "qwen2": (QWEN2, [None, "<|endoftext|>", "<|im_start|>", "<|im_end|>"], CONVERSATIONS),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"],
              [CONVERSATIONS[0], CONVERSATIONS[2]]),
}


def _folder(root, template, specials):
  """A tiny folder saved by transformers: a byte-level tokenizer with the family's specials."""
  import transformers
  from train.assets import tiny_hf
  bos, eos, *rest = specials
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tiny_hf.byte_tokenizer([t for t in specials if t]), bos_token=bos,
      eos_token=eos, additional_special_tokens=rest)
  tokenizer.chat_template = template
  tokenizer.save_pretrained(root)
  return str(root), tokenizer


def _ours(folder, messages):
  template = chat.Template(chat.read_template(folder), chat.special_tokens(folder))
  return chat.chat_tokens(tokenizer_for(folder), template, messages)


@pytest.mark.pretrained
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ids_and_assistant_mask_equal_transformers(family, tmp_path):
  template, specials, conversations = FAMILIES[family]
  folder, reference = _folder(tmp_path, template, specials)
  for messages in conversations:
    expected = reference.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = _ours(folder, messages)
    assert ids.tolist() == list(expected["input_ids"])
    assert mask.tolist() == list(expected["assistant_masks"])
    assert 0 < mask.sum() < len(mask)


@pytest.mark.pretrained
def test_a_template_without_markers_learns_its_text_split_at_the_assistant_headers(tmp_path):
  folder, reference = _folder(tmp_path, LLAMA3_PLAIN, FAMILIES["llama3"][1])
  header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
  for messages in CONVERSATIONS:
    text = reference.apply_chat_template(messages, tokenize=False)
    pieces = re.split(f"({re.escape(header)}.*?<\\|eot_id\\|>)", text, flags=re.S)
    expected_ids, expected_mask = [], []
    for piece in pieces:
      learned = piece.startswith(header)
      context, answer = (header, piece[len(header):]) if learned else (piece, "")
      for part, weight in ((context, 0), (answer, 1)):
        ids = reference.encode(part, add_special_tokens=False)
        expected_ids += ids
        expected_mask += [weight] * len(ids)
    ids, mask = _ours(folder, messages)
    assert ids.tolist() == expected_ids == list(reference.apply_chat_template(
        messages, tokenize=True, return_dict=True)["input_ids"])
    assert mask.tolist() == expected_mask


@pytest.mark.pretrained
def test_pipeline_rows_weigh_assistant_targets_only(tmp_path):
  """Packed rows: targets weighted 1 exactly where transformers' mask marks the next token."""
  folder, reference = _folder(tmp_path, QWEN2, FAMILIES["qwen2"][1])
  template = chat.Template(chat.read_template(folder), chat.special_tokens(folder))
  source = [{"messages": json.dumps(m)} for m in CONVERSATIONS]
  batches = pipeline.lm_pipeline(source, tokenizer_for(folder), batch_size=2, seq_len=256,
                                 chat_template=template, overlong="truncate", shuffle=False,
                                 num_epochs=1, process_index=0, process_count=1)
  seen = []
  for batch in batches:
    for row in range(len(batch["inputs"])):
      segments = batch["segment_ids"][row]
      assert np.all(batch["weights"][row][segments == 0] == 0)
      for segment in set(segments[segments > 0].tolist()):
        at = segments == segment
        seen.append((batch["inputs"][row][at].tolist(), batch["targets"][row][at].tolist(),
                     batch["weights"][row][at].tolist()))
  expected = []
  for messages in CONVERSATIONS:
    ref = reference.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(ref["input_ids"]), list(ref["assistant_masks"])
    expected.append((ids[:-1], ids[1:], [float(m) for m in mask[1:]]))
  assert sorted(seen) == sorted(expected)


@pytest.mark.pretrained
@pytest.mark.parametrize("family, end", [("llama3", "<|eot_id|>"), ("qwen2", "<|im_end|>"),
                                         ("gemma", "<end_of_turn>")])
def test_the_end_of_turn_is_the_token_the_template_closes_a_turn_with(family, end, tmp_path):
  template, specials, _ = FAMILIES[family]
  folder, reference = _folder(tmp_path, template, specials)
  ours = chat.Template(chat.read_template(folder), chat.special_tokens(folder))
  assert chat.end_of_turn_id(tokenizer_for(folder), ours) == reference.convert_tokens_to_ids(end)
  base = config.base_config()
  search = workdir.decoding_search(base.decode, base.task, base.data.targets_len,
                                   tokenizer_for(folder), ours)
  assert set(search.eos_id) == {reference.eos_token_id, reference.convert_tokens_to_ids(end)}


@pytest.mark.pretrained
def test_a_template_error_is_an_input_error(tmp_path):
  folder, _ = _folder(tmp_path, GEMMA, FAMILIES["gemma"][1])
  with pytest.raises(InputError, match="System role not supported"):
    _ours(folder, CONVERSATIONS[1])


def test_a_folder_without_a_template_names_the_option(tmp_path):
  (tmp_path / "tokenizer_config.json").write_text("{}")
  with pytest.raises(InputError, match=r"data\.source_options\.chat_template=PATH"):
    chat.read_template(str(tmp_path))
  (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
  assert chat.read_template(str(tmp_path), str(tmp_path / "t.jinja")).startswith("{{")


@pytest.mark.parametrize("line, problem", [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hey"}]},
     r"messages\[1\] has role 'bot'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
     r"messages\[1\] \(assistant\) has empty content"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                   {"role": "user", "content": "Bye"}]},
     "ends on a user turn"),
    ({"messages": []}, "non-empty list"),
])
def test_a_bad_line_is_one_error_naming_file_and_line(line, problem, tmp_path):
  good = {"messages": CONVERSATIONS[0]}
  path = tmp_path / "chats.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in [good, good, line, good]) + "\n")
  with pytest.raises(InputError, match=f"{re.escape(str(path))}:3: .*{problem}"):
    local.prepare(str(path), task="chat", data_dir=str(tmp_path / "data"))


def test_prepared_conversations_read_back_as_their_messages(tmp_path):
  path = tmp_path / "chats.jsonl"
  path.write_text("".join(json.dumps({"messages": m, "id": i}) + "\n"
                          for i, m in enumerate(CONVERSATIONS * 4)))
  stats = local.prepare(str(path), task="chat", data_dir=str(tmp_path / "data"),
                        validation_fraction=0.0, test_fraction=0.0)
  assert stats["examples"] == 12
  source = local.data_source(str(path), "train", task="chat", data_dir=str(tmp_path / "data"))
  read = [json.loads(source[i]["messages"]) for i in range(len(source))]
  assert read == [[{"role": m["role"], "content": m["content"]} for m in c]
                  for c in CONVERSATIONS * 4]


def test_only_chat_data_is_a_chat_run():
  class Data:
    source, source_options = "local:x.jsonl", {"task": "chat"}
  assert examples.chat(Data)
  Data.source_options = {"task": "instruct"}
  assert not examples.chat(Data)


def test_a_chat_run_needs_a_pretrained_tokenizer():
  from experiments import finetune_llama
  run = finetune_llama.get_config("chat")
  run.data.tokenizer = "bytes"
  with pytest.raises(InputError, match=r"set data\.tokenizer='pretrained', not 'bytes'"):
    validation.validate(run)
