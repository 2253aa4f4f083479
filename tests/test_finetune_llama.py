"""experiments/finetune_llama.py: LoRA on a LLaMA-family folder, for text or prompt -> response.

References: transformers' own tokenizer of the folder (the ids of each prompt and response, its
BOS), transformers' LlamaForCausalLM loading the exported folder, the checkpoint's imported
weights (from_hf) and the bundled JSONL read with the json module.
"""

import json
import pathlib

import jax
import numpy as np
import pytest
import tokenizers
from flax import traverse_util

from experiments import finetune_llama
from models import pretrained
from train import export, generate
from train.assets import tiny_hf
from train.data import examples, pipeline
from train.data.tokenizers import tokenizer_for
from train.engine import checkpoint, loop
from train.run import config as config_lib, inputs as inputs_lib, validation, workdir as workdir_lib

# The parity references; the file skips without them (CI's Python 3.12 run installs neither:
# torch 2.13.0 for 3.12 is a CUDA build of GBs).
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAIRS = [json.loads(line) for line in
         (ROOT / "experiments/data/tiny_instruct.jsonl").read_text().splitlines()]
TOL = 1e-4


def flat(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep="/")


def train_losses(workdir) -> list[float]:
  lines = map(json.loads, (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines())
  return [line["loss"] for line in lines if line["split"] == "train"]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
  """The tiny checkpoint, built once for this module, away from ~/.cache."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("TAPETE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield


@pytest.fixture(scope="module")
def instruct_run(tmp_path_factory):
  """finetune_llama:tiny,instruct trained by the loop."""
  config = config_lib.resolve_assets(finetune_llama.get_config("tiny,instruct"))
  config.train.checkpoint_every = config.train.num_steps  # the tests read the last only
  workdir = tmp_path_factory.mktemp("llama_sft")
  loop.train_and_evaluate(config, str(workdir))
  return config, workdir


@pytest.mark.slow
def test_the_tiny_recipe_learns_through_the_adapters_only(instruct_run):
  config, workdir = instruct_run
  losses = train_losses(workdir)
  assert len(losses) == config.train.num_steps
  assert losses[-1] < losses[0] - 0.05, losses

  _, start = pretrained.from_hf(config.init_from[len("hf:"):])
  saved = flat(checkpoint.load_params(workdir))
  start = flat(start)
  base = {p[len("base/"):]: x for p, x in saved.items() if p.startswith("base/")}
  adapters = {p: x for p, x in saved.items() if p.startswith("lora/")}
  assert base.keys() == start.keys() and len(base) + len(adapters) == len(saved)
  for path, value in start.items():
    np.testing.assert_array_equal(base[path], value, err_msg=path)
  layers, projections = 2, 4  # query, key, value, out
  assert len(adapters) == layers * projections * 2
  assert all(np.abs(x).max() > 0 for p, x in adapters.items() if p.endswith("/b"))


@pytest.mark.slow
def test_the_export_merges_the_adapters_and_transformers_computes_it(instruct_run, tmp_path):
  config, workdir = instruct_run
  out = tmp_path / "hf"
  export.export(str(workdir), str(out))
  run = workdir_lib.load(str(workdir))
  reference_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  tokens = np.array([reference_tokenizer(PAIRS[0]["prompt"])["input_ids"]])
  model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  with torch.no_grad():
    reference = model(torch.tensor(tokens)).logits.numpy()
  apply = jax.jit(run.model.apply)
  assert np.abs(np.asarray(apply({"params": run.params}, tokens)) - reference).max() <= TOL
  _, base = pretrained.from_hf(config.init_from[len("hf:"):])
  unadapted = np.asarray(apply({"params": base}, tokens))
  assert np.abs(unadapted - reference).max() > 100 * TOL  # The adapters are merged in.


@pytest.mark.slow
def test_generate_answers_a_prompt_laid_out_as_training_without_the_response(instruct_run):
  config, workdir = instruct_run
  run = workdir_lib.load(str(workdir))
  reference = transformers.AutoTokenizer.from_pretrained(config.init_from[len("hf:"):])
  prompt = PAIRS[0]["prompt"]
  np.testing.assert_array_equal(workdir_lib.model_inputs(run, prompt)["inputs"][0],
                                reference(prompt)["input_ids"])
  search = workdir_lib.decoding_search(config.decode, config.task, config.data.targets_len,
                                       run.input_tokenizer)
  answer = generate.answer_batch(run, [prompt], search, jax.random.key(0))[0]
  assert answer.new_tokens > 0 and not answer.output.startswith(prompt)  # The response alone.


def _qwen2_folder(root: pathlib.Path) -> str:
  """A Qwen2-style tokenizer folder (byte-level BPE, no BOS), saved by transformers."""
  vocab, merges = tiny_hf.bpe(tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False), 300,
                              [], [pair["prompt"] + " " + pair["response"] for pair in PAIRS])
  vocab["<|endoftext|>"] = len(vocab)
  transformers.Qwen2Tokenizer(vocab=vocab, merges=merges).save_pretrained(root)
  return str(root)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_rows_weigh_the_response_and_eos_only(family, tmp_path):
  folder = tiny_hf.folder("llama") if family == "llama" else _qwen2_folder(tmp_path)
  reference = transformers.AutoTokenizer.from_pretrained(folder)
  expected = {}
  for pair in PAIRS:  # BOS + prompt + response: the weights of the targets, EOS last.
    prompt = reference(pair["prompt"])["input_ids"]
    response = reference(pair["response"], add_special_tokens=False)["input_ids"]
    if reference.bos_token_id is None:  # Qwen2: the row starts with the EOS, as GPT-2's.
      prompt = [reference.eos_token_id] + prompt
    expected[tuple(prompt + response)] = [0] * (len(prompt) - 1) + [1] * (len(response) + 1)
  assert (reference.bos_token_id is None) == (family == "qwen2")

  batches = pipeline.lm_pipeline(PAIRS, tokenizer_for(folder), batch_size=4, seq_len=96,
                                 instruct=True, shuffle=False, num_epochs=1, process_index=0,
                                 process_count=1)
  seen, most_in_a_row = [], 0
  for batch in batches:
    for row in range(len(batch["inputs"])):
      segments = batch["segment_ids"][row]
      most_in_a_row = max(most_in_a_row, len(set(segments[segments > 0].tolist())))
      assert np.all(batch["weights"][row][segments == 0] == 0)
      for segment in set(segments[segments > 0].tolist()):
        at = segments == segment
        inputs = tuple(batch["inputs"][row][at].tolist())
        assert inputs in expected, reference.decode(inputs)
        assert batch["weights"][row][at].tolist() == expected[inputs]
        assert batch["targets"][row][at][-1] == reference.eos_token_id
        seen.append(inputs)
  assert sorted(seen) == sorted(expected)
  assert most_in_a_row > 1  # Really packed.


def test_the_layout_is_one_formula_for_training_and_answers():
  """instruct_tokens is lm_tokens of prompt + response, the response weighted (hand-worked)."""
  class Ids:
    bos_id, eos_id = 1, 2
  inputs, targets, weights = examples.instruct_tokens(Ids(), [10, 11], [20])
  assert inputs.tolist() == [1, 10, 11, 20] and targets.tolist() == [10, 11, 20, 2]
  assert weights.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("variant", ["tiny", "tiny,instruct", "tiny,chat"])
def test_documented_commands_name_the_variants_and_they_validate(variant):
  assert f"--config=experiments/finetune_llama.py:{variant} " in finetune_llama.__doc__
  config = config_lib.resolve_assets(finetune_llama.get_config(variant))
  validation.validate(config)
  assert examples.instruct(config.data) == ("instruct" in variant)
  assert examples.chat(config.data) == ("chat" in variant)


def test_instruct_data_needs_the_lm_task():
  config = finetune_llama.get_config("instruct")
  config.task = "seq2seq"
  with pytest.raises(ValueError, match=r"source_options\.task='instruct' .* trains an lm run, "
                                       r"not config\.task='seq2seq': set task='lm'\."):
    validation.validate(config)


def test_an_over_long_pair_is_truncated_not_split(tmp_path):
  """Each row is one pair cut at seq_len, opening with BOS + its prompt (a split pair's later
  pieces would teach a response without its prompt); transformers' tokenizer the reference."""
  config = config_lib.resolve_assets(finetune_llama.get_config("tiny,instruct"))
  config.data.seq_len, config.data.pack = 8, False
  reference = transformers.AutoTokenizer.from_pretrained(config.init_from[len("hf:"):])
  inputs = inputs_lib.make_inputs(config.task, config.data, config.seed, config.init_from,
                                  str(tmp_path))
  batches = iter(inputs.eval_pipeline(4))
  batch, counts = next(batches), batches.counts
  assert counts["split"] == 0 and counts["truncated"] == counts["examples"] == 4
  starts = {tuple(reference(pair["prompt"])["input_ids"][:8]) for pair in PAIRS}
  for row in batch["inputs"]:
    assert tuple(row.tolist()) in starts


def _chat_references(config) -> dict[tuple, list[float]]:
  """{inputs: weights} of each bundled conversation, cut at seq_len: transformers'
  apply_chat_template with the recipe's template, its assistant turns in generation markers."""
  template = pathlib.Path(config.data.source_options.chat_template).read_text()
  marked = template.replace("{{ ' ' + content.strip() + ' ' + eos_token }}",
                            "{% generation %}{{ ' ' + content.strip() + ' ' + eos_token }}"
                            "{% endgeneration %}")
  assert marked != template
  reference = transformers.AutoTokenizer.from_pretrained(config.init_from[len("hf:"):])
  references = {}
  for line in (ROOT / "experiments/data/tiny_chat.jsonl").read_text().splitlines():
    rendered = reference.apply_chat_template(
        json.loads(line)["messages"], chat_template=marked, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True)
    ids, mask = list(rendered["input_ids"]), list(rendered["assistant_masks"])
    cut = config.data.seq_len
    references[tuple(ids[:-1][:cut])] = [float(m) for m in mask[1:][:cut]]
  return references


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
  """finetune_llama:tiny,chat trained by the loop."""
  config = config_lib.resolve_assets(finetune_llama.get_config("tiny,chat"))
  config.train.eval_every = config.train.checkpoint_every = config.train.num_steps
  workdir = tmp_path_factory.mktemp("llama_chat")
  loop.train_and_evaluate(config, str(workdir))
  return config, workdir


@pytest.mark.slow
def test_the_tiny_chat_recipe_learns_the_assistant_turns_only(chat_run):
  """Each step's loss is over the assistant tokens of its conversations (transformers' mask),
  the step's token count in metrics.jsonl their sum."""
  config, workdir = chat_run
  references = _chat_references(config)
  lines = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
  logged = [line["tokens"] for line in lines if line["split"] == "train"]
  assert len(logged) == config.train.num_steps

  batches = inputs_lib.make_inputs(config.task, config.data, config.seed, config.init_from,
                                   str(workdir)).train_pipeline(config.train.batch_size)
  expected = []
  for _, batch in zip(range(config.train.num_steps), batches):
    learned = 0.0
    for row in range(len(batch["inputs"])):
      segments = batch["segment_ids"][row]
      for segment in set(segments[segments > 0].tolist()):
        at = segments == segment
        weights = references[tuple(batch["inputs"][row][at].tolist())]
        assert batch["weights"][row][at].tolist() == weights
        learned += sum(weights)
    expected.append(learned)
  assert logged == expected
  assert all(0 < tokens < config.train.batch_size * config.data.seq_len for tokens in logged)


@pytest.mark.slow
@pytest.mark.parametrize("given", ["text", "conversation"])
def test_generate_answers_a_user_turn_through_the_template_with_the_answer_alone(chat_run, given):
  """The prompt is transformers' apply_chat_template(..., add_generation_prompt=True); the
  output is the assistant's text, without the prompt or the template's markup."""
  config, workdir = chat_run
  run = workdir_lib.load(str(workdir))
  reference = transformers.AutoTokenizer.from_pretrained(config.init_from[len("hf:"):])
  template = pathlib.Path(config.data.source_options.chat_template).read_text()
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Qual é a capital do Brasil?"}]
  text = (json.dumps({"messages": messages}) if given == "conversation"
          else messages[1]["content"])
  expected = reference.apply_chat_template(
      messages if given == "conversation" else messages[1:], chat_template=template,
      add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
  np.testing.assert_array_equal(workdir_lib.model_inputs(run, text)["inputs"][0], expected)
  search = workdir_lib.decoding_search(config.decode, config.task, config.data.targets_len,
                                       run.input_tokenizer, run.chat_template)
  assert reference.eos_token_id in search.eos_id
  answer = generate.answer_batch(run, [text], search, jax.random.key(0))[0]
  assert answer.new_tokens > 0
  assert "[INST]" not in answer.output and "Brasil?" not in answer.output
