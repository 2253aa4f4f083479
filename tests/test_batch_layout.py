"""train.run.inputs.BatchLayout: each batch's segment capacity, and the batch as the model takes it.

Rows of one example reach the model without segment ids (plain causal attention), packed rows
with a capacity rounded up from their most segments; the loss and its gradients are those of
the model with the reference attention over the segment ids, on every path.
"""

import dataclasses
import textwrap

import jax
import numpy as np
import pytest

from experiments import gpt2_small, transformer_base
from models import attention_choice, attention_kernels
from test_segment_capacity import cudnn_segments  # noqa: F401  (a fixture)
from train.engine import loop, tasks
from train.run import inputs as inputs_lib
import two_processes


def test_capacities_are_few_buckets():
  capacity = attention_kernels.segment_capacity
  assert [capacity(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 16, 17, 33, 64)] == [
      1, 1, 4, 4, 4, 8, 8, 16, 16, 32, 64, 64]
  assert [capacity(n) for n in (65, 128, 129, 300)] == [128, 128, 256, 512]


def ids_of(*rows, length=8):
  return np.stack([np.pad(np.asarray(r), (0, length - len(r))) for r in rows]).astype(np.int32)


def test_local_capacity_reads_the_rows():
  local = inputs_lib.local_capacity
  assert local(ids_of([1, 1, 1], [1], [])) == 1  # one example a row, padding after it
  assert local(ids_of([1, 1, 2, 2, 3], [1])) == 4
  assert local(ids_of(list(range(1, 6)), [1])) == 8
  assert local(ids_of([0, 0, 1, 1])) == 4  # padding before the example: not plain causal
  with pytest.raises(RuntimeError, match="not above the ids before it"):
    local(ids_of([1, 1, 2, 1]))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  """The tiny GPT-2 experiment and its params."""
  config = gpt2_small.get_config("tiny")
  exp = loop.build(config, str(tmp_path_factory.mktemp("gpt2")))
  return exp, exp.trainable.init(jax.random.key(0))


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
  """The tiny encoder-decoder experiment and its params."""
  config = transformer_base.get_config("tiny")
  exp = loop.build(config, str(tmp_path_factory.mktemp("transformer")))
  return exp, exp.trainable.init(jax.random.key(0))


def first_batch(exp, pack: bool):
  exp.config.data.pack = pack
  try:
    return next(iter(exp.inputs.train_pipeline(exp.config.train.batch_size)))
  finally:
    exp.config.data.pack = True


def reference_loss(exp, params, batch):
  """(objective, gradients) of the model with the reference attention over the batch's ids."""
  model_cfg = dataclasses.replace(exp.model_cfg, attention_implementation="reference")
  task = dataclasses.replace(exp.task, model=tasks.make_model(exp.task.name, model_cfg))
  return jax.jit(jax.value_and_grad(lambda p, b: task.loss(p, b)[0]))(params, batch)


def loss_at(exp, params, batch, capacity):
  """(objective, gradients) of the run's model for the batch it takes at `capacity`."""
  with attention_kernels.segments_at_most(capacity):  # read as jit traces
    return jax.jit(jax.value_and_grad(lambda p, b: exp.task.loss(p, b)[0]))(params, batch)


def assert_same_loss(actual, expected):
  np.testing.assert_allclose(actual[0], expected[0], rtol=2e-6)
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=2e-4, atol=2e-6),
               actual[1], expected[1])


@pytest.mark.parametrize("experiment", ["gpt2", "transformer"])
def test_rows_of_one_example_reach_the_model_without_segment_ids(experiment, request,
                                                                 monkeypatch):
  exp, params = request.getfixturevalue(experiment)
  raw = first_batch(exp, pack=False)
  assert np.any(raw["weights"] == 0), "the test needs padding"
  capacity, batch = inputs_lib.BatchLayout(exp.config.task, exp.config.data)(raw)
  assert capacity == 1
  assert not any(key.endswith(("segment_ids", "positions")) for key in batch)
  if experiment == "transformer":
    np.testing.assert_array_equal(batch["encoder_padding_mask"], raw["encoder_segment_ids"] != 0)
  expected = reference_loss(exp, params, raw)
  seen = []
  choose = attention_choice.select_implementation
  def recording(implementation, query, **kwargs):
    seen.append(kwargs["packed_causal"])
    return choose(implementation, query, **kwargs)
  monkeypatch.setattr(attention_choice, "select_implementation", recording)

  assert_same_loss(loss_at(exp, params, batch, capacity), expected)
  assert seen and not any(seen)  # no attention of the model took the packed path


@pytest.mark.parametrize("experiment", ["gpt2", "transformer"])
def test_packed_rows_run_cudnn_at_their_capacity(experiment, request, cudnn_segments):
  """cuDNN's packed layout (emulated on this CPU) built for the batch's bucket, not for 64."""
  exp, params = request.getfixturevalue(experiment)
  raw = first_batch(exp, pack=True)
  ids = "segment_ids" if experiment == "gpt2" else "decoder_segment_ids"
  most = max(len(set(row) - {0}) for row in raw[ids].tolist())
  capacity, batch = inputs_lib.BatchLayout(exp.config.task, exp.config.data)(raw)
  assert most > 1 and capacity == attention_kernels.segment_capacity(most)
  assert batch is raw
  assert_same_loss(loss_at(exp, params, batch, capacity), reference_loss(exp, params, raw))
  assert set(cudnn_segments) == {capacity}


def test_the_table_picks_by_the_promised_capacity(monkeypatch):
  monkeypatch.setattr(attention_choice, "PACKED_GPU_KERNELS",
                      {4: ("pallas",), 16: ("cudnn_packed",), 64: ("xla",)})
  rows = {n: attention_choice.packed_gpu_kernels(n) for n in (1, 4, 5, 16, 64, 128, None)}
  assert rows == {1: ("pallas",), 4: ("pallas",), 5: ("cudnn_packed",), 16: ("cudnn_packed",),
                  64: ("xla",), 128: ("xla",), None: ("xla",)}


# Two processes, one CPU device each, read rows of different segment counts: 2 and 6 a row,
# then 3 and 2 (no data.max_segments_per_row, or 64), or one example a row of 3 or 4 tokens.
TWO_PROCESS_WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import ml_collections
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from train.engine import parallel
    from train.run import inputs as inputs_lib
    port, pid = sys.argv[1], int(sys.argv[2])
    parallel.maybe_initialize_distributed(
        {"coordinator_address": f"localhost:{port}", "num_processes": 2, "process_id": pid})

    def packed(segments):
      ids = np.zeros((2, 16), np.int32)
      ids[0, :2 * segments] = np.repeat(np.arange(1, segments + 1), 2)
      ids[1, :3] = 1
      return {"segment_ids": ids}

    one_each = {"segment_ids": (np.arange(16) < 3 + pid).astype(np.int32)[None].repeat(2, 0)}
    batches = [packed((2, 6)[pid]), packed((3, 2)[pid]), packed((2, 6)[pid])]
    capacities = {}
    for pack, limit in ((True, 0), (True, 64), (False, 0)):
      config = ml_collections.ConfigDict(
          {"task": "lm", "data": {"pack": pack, "max_segments_per_row": limit}})
      layout = inputs_lib.BatchLayout(config.task, config.data, name=f"{pack}/{limit}")
      capacities[f"{pack}/{limit}"] = [layout(batch if pack else one_each)[0]
                                       for batch in batches]
    # A finite pipeline's batches in lockstep: process 1 reads a batch fewer (or none at all).
    mine = batches[:3 - pid]
    for name, pack, limit, rows in (("lockstep", True, 0, mine), ("lockstep/2", True, 2, mine),
                                    ("lockstep/unpacked", False, 0, [one_each] * (2 - pid))):
      config = ml_collections.ConfigDict({"task": "lm", "data": {"pack": pack}})
      steps = inputs_lib.BatchLayout(config.task, config.data, name=name).lockstep(iter(rows),
                                                                                   limit)
      capacities[name] = [[capacity, sorted(model_batch), int(batch["segment_ids"].max())]
                          for capacity, model_batch, batch in steps]
    try:
      layout = inputs_lib.BatchLayout(config.task, config.data, name="none")
      capacities["none"] = list(layout.lockstep(iter([one_each] if pid == 0 else [])))
    except ValueError as e:
      capacities["none"] = str(e)
    parallel._coordination_client = lambda: None  # The all-gather where there is no service.
    config = ml_collections.ConfigDict({"task": "lm", "data": {"pack": True}})
    capacities["all-gather"] = [inputs_lib.BatchLayout(config.task, config.data)(batch)[0]
                                for batch in batches]
    print(json.dumps(capacities))
""")


@pytest.mark.slow
def test_processes_agree_on_the_capacity():
  """The processes take the largest of their capacities, batch by batch (with a limit too);
  rows of one example, 1. In lockstep, a process out of batches takes all-zero ones until
  every process is out (the first `limit` only with one); one without any stops them all."""
  results = two_processes.run(TWO_PROCESS_WORKER)
  lockstep = [[[8, ["segment_ids"], last] for last in (2, 6)],
              [[4, ["segment_ids"], last] for last in (3, 2)],
              [[4, ["segment_ids"], last] for last in (2, 0)]]  # process 1: an empty batch
  none = ("A process read no batch of the none split (its share of the examples was empty or "
          "all dropped): use a larger split or fewer than 2 processes.")
  for pid, result in enumerate(results):
    assert result == {"True/0": [8, 4, 8], "True/64": [8, 4, 8], "False/0": [1, 1, 1],
                      "lockstep": [step[pid] for step in lockstep],
                      "lockstep/2": [step[pid] for step in lockstep[:2]],
                      "lockstep/unpacked": [[1, [], 1], [1, [], 1 - pid]],
                      "none": none, "all-gather": [8, 4, 8]}
