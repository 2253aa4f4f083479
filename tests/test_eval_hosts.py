"""The eval on several processes: as many steps on each, and decoding scored in one order.

Two processes (2 CPU devices each) evaluate a split of 17 pairs, 4 rows a process a batch: one
reads 3 batches, the other 2, and `train.eval_batches` is 0 (all of them). The reference is
one process over the same split. The model that decodes copies its input (the pairs' targets
are their inputs), so a prediction scored against another example's reference shows as an
exact match below 1; the mesh is built from the devices in their order, then reversed, which
puts the second process's rows first in the global batch.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import pytest

from conftest import OLDER_EMITTERS
from models import decoding
from train.engine import loop

pytestmark = pytest.mark.slow  # two processes started, a tiny model compiled in each

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_TEST = 17  # 9 and 8 pairs: 3 and 2 batches of 4 rows a process
EXPERIMENT = """\
from experiments import quickstart

def get_config(data):
  c = quickstart.get_config("tiny")
  c.data.source = f"local:{data}"
  c.data.source_options = {}
  c.data.tokenizer = "bytes"
  c.data.target_tokenizer = ""
  c.data.vocab_size = 0
  c.model.share_embeddings = True
  c.train.batch_size = 8
  c.train.eval_batches = 0
  c.train.print_examples = 0
  return c
"""
WORKER = textwrap.dedent("""
    import json, os, sys, types
    os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                               "--xla_backend_optimization_level=0 "
                               "--xla_llvm_disable_expensive_passes=true " + sys.argv[5])
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from models import decoding
    from train.engine import loop, parallel
    port, pid, experiment_dir, data = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    parallel.maybe_initialize_distributed(
        {"coordinator_address": f"localhost:{port}", "num_processes": 2, "process_id": pid})
    sys.path.insert(0, experiment_dir)
    import copy_experiment
    decoding.generate_encoder_decoder = (  # The model that decodes copies its input.
        lambda model, params, tokens_BS, search, **kwargs: types.SimpleNamespace(
            tokens_BN=tokens_BS))
    config = copy_experiment.get_config(data)
    exp = loop.build(config, os.path.join(experiment_dir, "run"))
    results = {}
    for order, devices in (("natural", jax.devices()), ("reversed", jax.devices()[::-1])):
      exp.mesh = parallel.make_mesh(config.mesh, devices)
      evaluator = loop.Evaluator(exp)
      state, _ = loop.init_state(exp, jax.random.key(0))
      results[order] = {"processes": [d.process_index for d in exp.mesh.devices.flat],
                        **evaluator.evaluate(evaluator.model_params(state.params))}
    print(json.dumps(results))
""")


def write_copy_pairs(folder: pathlib.Path) -> None:
  """Pairs whose target is their input, each of 4 words, none twice."""
  rng = np.random.default_rng(0)
  words = ["ab", "cd", "ef", "gh", "ij", "kl"]
  folder.mkdir()
  for split, count in (("train", 8), ("test", NUM_TEST)):
    lines = [f"n{i} " + " ".join(rng.choice(words, 3)) for i in range(count)]
    (folder / f"{split}.tsv").write_text("".join(f"{line}\t{line}\n" for line in lines))


def free_port() -> str:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return str(sock.getsockname()[1])


def test_two_processes_with_uneven_shards_evaluate_like_one(tmp_path, monkeypatch):
  data = tmp_path / "pairs"
  write_copy_pairs(data)
  (tmp_path / "copy_experiment.py").write_text(EXPERIMENT)
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  port = free_port()
  workers = [subprocess.Popen(
      [sys.executable, "-c", WORKER, port, str(pid), str(tmp_path), str(data), OLDER_EMITTERS],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for pid in (0, 1)]
  try:
    # Meanwhile, the reference: one process, 8 devices, the whole split.
    monkeypatch.syspath_prepend(str(tmp_path))
    import copy_experiment
    monkeypatch.setattr(decoding, "generate_encoder_decoder",
                        lambda model, params, tokens_BS, search, **kwargs: types.SimpleNamespace(
                            tokens_BN=tokens_BS))
    exp = loop.build(copy_experiment.get_config(str(data)), str(tmp_path / "one"))
    evaluator = loop.Evaluator(exp)
    state, _ = loop.init_state(exp, jax.random.key(0))
    reference = evaluator.evaluate(evaluator.model_params(state.params))
    outputs = [worker.communicate(timeout=300) for worker in workers]
  finally:
    for worker in workers:
      worker.kill()
  assert all(worker.returncode == 0 for worker in workers), outputs
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

  assert reference["data_examples"] == NUM_TEST and reference["decoded"] == NUM_TEST
  assert reference["exact_match"] == 1.0  # the copying model, scored in one process
  assert results[0] == results[1]
  by_order = results[0]
  assert by_order["natural"].pop("processes") == [0, 0, 1, 1]
  assert by_order["reversed"].pop("processes") == [1, 1, 0, 0]
  for order, result in by_order.items():
    assert result.keys() == reference.keys(), order
    for key, value in reference.items():
      np.testing.assert_allclose(result[key], value, rtol=1e-6, err_msg=f"{order}: {key}")
