"""train.engine.parallel, train.engine.state: mesh shapes, shardings, sharded training == 1 device.

References: flax's own unsharded `model.init` and optax's `tx.init`, the FSDP / Megatron layout
written out by hand (shard shapes), and the same training run on a 1-device mesh.
"""

import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models.config import TransformerConfig
from models.transformer import DecoderOnly
from train.engine import loop, parallel
from train.engine.state import TrainState
from train.run import config as config_lib
import two_processes

# No biases: the key projection's bias has an exactly zero gradient (softmax ignores a constant
# per query), and Adam turns the float noise there into full +-lr steps that differ per mesh.
MODEL_CFG = TransformerConfig(vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_layers=1,
                              max_len=16, position="learned", use_bias=False, dropout_rate=0.1)
TX = optax.adamw(1e-2, weight_decay=0.1)
BATCH, LENGTH, NUM_STEPS = 16, 8, 3
SHARDED_MESHES = ["data=8", "data=2,fsdp=4", "data=2,tensor=4"]


def parse_mesh(name):
  return {axis: int(size) for axis, size in (item.split("=") for item in name.split(","))}


def make_init_fn(model):
  tokens_BT = jnp.zeros((2, LENGTH), jnp.int32)

  def init_fn(key):
    params = model.init(key, tokens_BT)["params"]
    return TrainState.create(params=params, tx=TX, rng=jax.random.fold_in(key, 1))

  return init_fn


@pytest.fixture(scope="module")
def reference_params():
  """flax's own init on one device, jitted like ours (eager sampling rounds differently)."""
  model = DecoderOnly(MODEL_CFG)
  init = jax.jit(lambda k: nn.unbox(model.init(k, jnp.zeros((2, LENGTH), jnp.int32))["params"]))
  return jax.device_get(init(jax.random.key(0)))


def shard_shape(array):
  return array.sharding.shard_shape(array.shape)


# ------------------------------------------------------------------------------------------
# One training run per mesh, shared by the tests below (compiling is what costs time).


def train_step(model, state, batch):
  """A plain next-token loss with dropout, one AdamW update."""
  def loss_fn(params):
    logits_BTV = model.apply({"params": params}, batch["inputs"], deterministic=False,
                             rngs={"dropout": state.step_key()})
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"]).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads, TX), loss


def run_training(mesh):
  """init_state, then NUM_STEPS donated steps; returns what the tests check, on the host."""
  model = DecoderOnly(MODEL_CFG)
  rules = parallel.DEFAULT_RULES
  state, shardings = parallel.init_state(make_init_fn(model), mesh, rules, jax.random.key(0))
  initial = jax.tree.map(lambda a: np.array(a, copy=True), state)  # no view: donation works
  placed = jax.tree.map(lambda a: a.sharding, state)
  step = jax.jit(lambda s, b: train_step(model, s, b),
                 in_shardings=(shardings, parallel.batch_sharding(mesh, rules)),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  tokens = np.random.default_rng(1).integers(0, MODEL_CFG.vocab_size,
                                             (NUM_STEPS, BATCH, LENGTH + 1), np.int32)
  losses = []
  for tokens_BT in tokens:
    batch = parallel.host_to_global({"inputs": tokens_BT[:, :-1], "targets": tokens_BT[:, 1:]},
                                    mesh, rules)
    previous = state
    state, loss = step(state, batch)
    assert previous.params["token_embed"]["embedding"].is_deleted()  # the state was donated
    losses.append(float(loss))
  return {"initial": initial, "placed": placed, "shardings": shardings,
          "losses": np.array(losses), "final": jax.device_get(state)}


@pytest.fixture(scope="module")
def runs():
  cache = {}

  def get(name):
    if name not in cache:
      devices = jax.devices()[:1] if name == "one device" else None
      cache[name] = run_training(parallel.make_mesh(None if devices else parse_mesh(name),
                                                    devices))
    return cache[name]

  return get


# ------------------------------------------------------------------------------------------
# Mesh.


@pytest.mark.parametrize("mesh_cfg, shape", [
    (None, (8, 1, 1)),
    (dict(data=-1), (8, 1, 1)),
    (dict(data=2, fsdp=4), (2, 4, 1)),
    (dict(data=2, fsdp=-1, tensor=2), (2, 2, 2)),
    (dict(data=-1, tensor=4), (2, 1, 4)),
    (dict(data=1, fsdp=1, tensor=8), (1, 1, 8)),
])
def test_mesh_shape_resolves_the_rest(mesh_cfg, shape):
  mesh = parallel.make_mesh(mesh_cfg)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert mesh.devices.shape == shape
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_mesh_on_chosen_devices():
  mesh = parallel.make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.devices()[:1])
  assert mesh.devices.shape == (1, 1, 1)
  assert mesh.devices.flat[0] == jax.devices()[0]


@pytest.mark.parametrize("mesh_cfg, match", [
    (dict(data=-1, fsdp=-1), "at most one axis may be -1"),
    (dict(data=3), "has 3 devices but there are 8"),
    (dict(data=2, fsdp=2), "has 4 devices but there are 8"),
    (dict(data=-1, fsdp=3), "multiply to 3, which does not divide the 8 devices"),
    (dict(data=0), "must be a positive integer or -1"),
    (dict(data=8, tensor=2.0), "must be a positive integer or -1"),
])
def test_mesh_errors_name_the_numbers(mesh_cfg, match):
  with pytest.raises(ValueError, match=match):
    parallel.make_mesh(mesh_cfg)


# ------------------------------------------------------------------------------------------
# Rules and shardings.


def test_rule_overrides():
  rules = dict(parallel.logical_rules({"embed": None, "vocab": ["tensor", "fsdp"],
                                       "experts": "data"}))
  assert rules["embed"] is None
  assert rules["vocab"] == ("tensor", "fsdp")
  assert rules["experts"] == "data"
  assert rules["mlp"] == "tensor"  # untouched defaults stay
  assert parallel.logical_rules(None) == parallel.DEFAULT_RULES
  with pytest.raises(ValueError, match="mesh axes are"):
    parallel.logical_rules({"embed": "model"})


# Expected shard shapes of a few parameters: FSDP splits "embed", Megatron tensor parallelism
# splits heads / mlp / vocab. Full shapes: embedding (64, 32), query kernel (32, 4, 8),
# out kernel (4, 8, 32), wi kernel (32, 64), wo kernel (64, 32), position table (16, 32).
EXPECTED_SHARDS = {
    "data=8": {"embedding": (64, 32), "query": (32, 4, 8), "out": (4, 8, 32),
               "wi": (32, 64), "wo": (64, 32), "position": (16, 32)},
    "data=2,fsdp=4": {"embedding": (64, 8), "query": (8, 4, 8), "out": (4, 8, 8),
                      "wi": (8, 64), "wo": (64, 8), "position": (16, 8)},
    "data=2,tensor=4": {"embedding": (16, 32), "query": (32, 1, 8), "out": (1, 8, 32),
                        "wi": (32, 16), "wo": (16, 32), "position": (16, 32)},
}


def _named_params(params):
  layer = params["decoder"]["layers_0"]
  return {"embedding": params["token_embed"]["embedding"],
          "query": layer["self_attention"]["query"]["kernel"],
          "out": layer["self_attention"]["out"]["kernel"],
          "wi": layer["mlp"]["wi"]["kernel"], "wo": layer["mlp"]["wo"]["kernel"],
          "position": params["decoder"]["embedder"]["position_embed"]["embedding"]}


def named_shard_shapes(shardings, params):
  shapes = {name: array.shape for name, array in _named_params(params).items()}
  return {name: s.shard_shape(shapes[name]) for name, s in _named_params(shardings).items()}


def assert_equivalent(actual, expected, ndim):
  assert actual.is_equivalent_to(expected, ndim), (actual, expected)


@pytest.mark.parametrize("name", SHARDED_MESHES)
def test_init_state_shardings(name, runs, reference_params):
  run = runs(name)
  arrays, placed = run["initial"], run["placed"]
  assert named_shard_shapes(placed.params, arrays.params) == EXPECTED_SHARDS[name]
  adam = placed.opt_state[0]
  for moment in (adam.mu, adam.nu):  # the optimizer state is sharded like the params
    assert named_shard_shapes(moment, arrays.params) == EXPECTED_SHARDS[name]
  assert placed.step.is_fully_replicated and arrays.step.dtype == np.int32
  assert placed.rng.is_fully_replicated and arrays.rng.dtype == np.uint32
  jax.tree.map(lambda a, p, s: assert_equivalent(p, s, a.ndim), arrays, placed, run["shardings"])
  # The values of flax's plain, unsharded init, and optax's init of those params.
  jax.tree.map(np.testing.assert_array_equal, arrays.params, reference_params)
  jax.tree.map(np.testing.assert_array_equal, arrays.opt_state, TX.init(reference_params))


# float32, matmul precision "highest" (conftest): only the order of the reductions differs.
RTOL, ATOL = 1e-5, 1e-6


@pytest.mark.parametrize("name", SHARDED_MESHES)
def test_sharded_training_equals_one_device(name, runs):
  reference, sharded = runs("one device"), runs(name)
  assert reference["losses"][-1] < reference["losses"][0]  # it does train
  np.testing.assert_allclose(sharded["losses"], reference["losses"], rtol=RTOL)
  assert int(sharded["final"].step) == NUM_STEPS
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
  jax.tree.map(close, sharded["final"].params, reference["final"].params)
  jax.tree.map(close, sharded["final"].opt_state, reference["final"].opt_state)


def test_abstract_init_carries_shardings():
  mesh = parallel.make_mesh(dict(data=2, fsdp=4))
  abstract, shardings = parallel.abstract_init(make_init_fn(DecoderOnly(MODEL_CFG)), mesh,
                                               parallel.DEFAULT_RULES, jax.random.key(0))
  embedding = abstract.params["token_embed"]["embedding"]
  assert isinstance(embedding, jax.ShapeDtypeStruct)
  assert embedding.shape == (64, 32) and embedding.sharding.shard_shape((64, 32)) == (64, 8)
  assert embedding.sharding == shardings.params["token_embed"]["embedding"]


def test_indivisible_dims_fall_back_to_replication(caplog):
  cfg = MODEL_CFG.replace(vocab_size=37, num_kv_heads=2)
  model = DecoderOnly(cfg)
  mesh = parallel.make_mesh(dict(data=2, tensor=4))
  key = jax.random.key(0)
  # The shardings init_state places the state with (test_init_state_shardings), not compiled.
  state, _ = parallel.abstract_init(make_init_fn(model), mesh, parallel.DEFAULT_RULES, key)
  layer = state.params["decoder"]["layers_0"]
  assert shard_shape(state.params["token_embed"]["embedding"]) == (37, 32)  # vocab replicated
  assert shard_shape(layer["self_attention"]["key"]["kernel"]) == (32, 2, 8)  # kv_heads too
  assert shard_shape(layer["self_attention"]["query"]["kernel"]) == (32, 1, 8)  # heads split
  assert shard_shape(layer["mlp"]["wi"]["kernel"]) == (32, 16)
  assert "vocab=37 over tensor=4" in caplog.text and "kv_heads=2 over tensor=4" in caplog.text


def placement(array) -> dict:
  """{the block of `array` a device holds, as ((start, stop) per dim): its device ids}, after
  checking that each device's data is that block of the whole array."""
  whole, blocks = np.asarray(array), {}
  for shard in array.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), whole[shard.index])
    block = tuple(slice_.indices(size)[:2] for slice_, size in zip(shard.index, array.shape))
    blocks.setdefault(block, set()).add(shard.device.id)
  return blocks


@pytest.mark.parametrize("fsdp", [1, 4])
def test_mesh_fsdp_of_the_config_places_the_params(fsdp, tmp_path):
  config = config_lib.base_config()
  config.model.update(dict(d_model=32, num_heads=4, d_ff=64, num_layers=1, max_len=16,
                           position="learned"))
  config.data.seq_len = 16
  config.mesh.fsdp = fsdp
  exp = loop.build(config, str(tmp_path))
  state, _ = loop.init_state(exp, jax.random.key(0))
  assert exp.mesh.devices.shape == (8 // fsdp, fsdp, 1)
  params = _named_params(state.params)
  assert params["embedding"].shape == (260, 32)  # bytes: 256 + 4 special tokens
  # The embed dimension (d_model=32) in fsdp blocks; block j on the devices of fsdp index j,
  # one copy per data index. fsdp=1: every device holds the whole array.
  width = 32 // fsdp
  on_fsdp = lambda j: {d.id for d in exp.mesh.devices[:, j, 0]}
  blocks = lambda make: {make((j * width, (j + 1) * width)): on_fsdp(j) for j in range(fsdp)}
  assert placement(params["embedding"]) == blocks(lambda cols: ((0, 260), cols))
  assert placement(params["query"]) == blocks(lambda rows: (rows, (0, 4), (0, 8)))
  assert placement(params["wo"]) == blocks(lambda cols: ((0, 64), cols))
  assert placement(params["position"]) == blocks(lambda cols: ((0, 16), cols))
  wi_bias = state.params["decoder"]["layers_0"]["mlp"]["wi"]["bias"]  # no embed dimension
  assert placement(wi_bias) == {((0, 64),): set(range(8))}


# ------------------------------------------------------------------------------------------
# Batches.


def test_host_to_global_splits_rows_over_data_and_fsdp():
  mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2))
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, 100, (8, 5)), "weights": rng.random((8, 5), np.float32),
           "num_examples": np.int32(8)}
  placed = parallel.host_to_global(batch, mesh)
  assert parallel.data_parallel_size(mesh) == 4
  for key in ("tokens", "weights"):
    np.testing.assert_array_equal(np.asarray(placed[key]), batch[key])
    assert shard_shape(placed[key]) == (2, 5)
    assert placed[key].sharding.is_equivalent_to(parallel.batch_sharding(mesh), 2)
  assert placed["num_examples"].sharding.is_fully_replicated
  with pytest.raises(ValueError, match=r"\['tokens'\] has 6 rows.*multiple of 4"):
    parallel.host_to_global({"tokens": batch["tokens"][:6]}, mesh)


# Two processes with 2 CPU devices each: each passes its own 4 rows, the global batch has 8.
TWO_PROCESS_WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from train.engine import parallel
    port, pid = sys.argv[1], int(sys.argv[2])
    started = parallel.maybe_initialize_distributed(
        {"coordinator_address": f"localhost:{port}", "num_processes": 2, "process_id": pid})
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2})
    local = np.arange(12).reshape(4, 3) + 100 * pid
    x = parallel.host_to_global({"x": local}, mesh)["x"]
    total = jax.jit(lambda a: a.sum(0), out_shardings=parallel.replicated(mesh))(x)
    try:
      parallel.host_to_global({"x": local[:1]}, mesh)
      error = ""
    except ValueError as e:
      error = str(e)
    print(json.dumps({"started": started, "shape": x.shape,
                      "rows": sorted([s.index[0].start, np.asarray(s.data)[:, 0].tolist()]
                                     for s in x.addressable_shards),
                      "total": np.asarray(total.addressable_data(0)).tolist(), "error": error}))
""")


@pytest.mark.slow
def test_host_to_global_across_two_processes():
  results = two_processes.run(TWO_PROCESS_WORKER)
  expected_total = (np.arange(12).reshape(4, 3) * 2 + 100).sum(0).tolist()
  for pid, result in enumerate(results):
    assert result["started"] and result["shape"] == [8, 3]
    # Process 0's rows come first in the global batch, then process 1's.
    assert result["rows"] == [[4 * pid, [100 * pid, 100 * pid + 3]],
                              [4 * pid + 2, [100 * pid + 6, 100 * pid + 9]]]
    assert result["total"] == expected_total
    assert "has 2 rows in all, not a multiple of the data-parallel size 4" in result["error"]


# ------------------------------------------------------------------------------------------
# TrainState.


def test_train_state_keys():
  key = jax.random.key(3)
  state = TrainState.create(params={"w": jnp.ones(2)}, tx=optax.sgd(0.1), rng=key)
  np.testing.assert_array_equal(state.rng, jax.random.key_data(key))
  from_raw = TrainState.create(params={"w": jnp.ones(2)}, tx=optax.sgd(0.1),
                               rng=jax.random.PRNGKey(3))
  np.testing.assert_array_equal(from_raw.rng, state.rng)
  expected = jax.random.fold_in(key, 0)
  np.testing.assert_array_equal(jax.random.key_data(state.step_key()),
                                jax.random.key_data(expected))
  later = state.apply_gradients({"w": jnp.ones(2)}, optax.sgd(0.1))
  assert int(later.step) == 1
  np.testing.assert_allclose(later.params["w"], [0.9, 0.9], rtol=1e-6)
  assert not np.array_equal(jax.random.key_data(later.step_key()),
                            jax.random.key_data(expected))
  with pytest.raises(ValueError, match="typed key or uint32"):
    TrainState.create(params={}, tx=optax.sgd(0.1), rng=jnp.zeros(2, jnp.int32))


# ------------------------------------------------------------------------------------------
# Multi-host start.


@pytest.fixture
def fake_initialize(monkeypatch):
  calls = []
  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
               "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
  return calls


# train/run/config.py's defaults: "", 0 and -1 mean "not set".
CONFIG_DEFAULTS = {"enabled": False, "coordinator_address": "", "num_processes": 0,
                   "process_id": -1}


def test_distributed_not_started_on_a_single_machine(fake_initialize):
  assert parallel.maybe_initialize_distributed(None) is False
  assert parallel.maybe_initialize_distributed({"distributed": CONFIG_DEFAULTS}) is False
  assert fake_initialize == []


def test_distributed_started_from_the_config_once(fake_initialize):
  cfg = {"distributed": {**CONFIG_DEFAULTS, "coordinator_address": "10.0.0.1:1234",
                         "num_processes": 2, "process_id": 0}}
  assert parallel.maybe_initialize_distributed(cfg) is True
  assert parallel.maybe_initialize_distributed(cfg) is True
  assert fake_initialize == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                              "process_id": 0}]


def test_distributed_enabled_leaves_the_rest_to_jax(fake_initialize):
  assert parallel.maybe_initialize_distributed({**CONFIG_DEFAULTS, "enabled": True}) is True
  assert fake_initialize == [{}]


@pytest.mark.parametrize("env", [
    {"OMPI_COMM_WORLD_SIZE": "4"},
    {"TPU_WORKER_HOSTNAMES": "host-0,host-1"},
    {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
     "SLURM_PROCID": "0", "SLURM_LOCALID": "0"},
])
def test_distributed_auto_detects_clusters(fake_initialize, monkeypatch, env):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert parallel.maybe_initialize_distributed(CONFIG_DEFAULTS) is True
  assert fake_initialize == [{}]  # jax.distributed.initialize detects the rest


def test_distributed_ignores_single_task_launches(fake_initialize, monkeypatch):
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
  assert parallel.maybe_initialize_distributed(CONFIG_DEFAULTS) is False
  assert fake_initialize == []


def test_distributed_bad_switch(fake_initialize):
  with pytest.raises(ValueError, match="distributed.enabled"):
    parallel.maybe_initialize_distributed({"enabled": "yes"})
