"""train.engine.checkpoint: round trips onto other meshes, keep/every, crash safety, errors."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from train.engine import checkpoint, checkpoint_metadata
from train.engine.checkpoint import CheckpointError, CheckpointReadError, Checkpointer
from train.engine.preemption import PreemptionGuard
from train.engine.state import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(seed: float = 0.0) -> dict:
  rng = np.random.default_rng(int(seed))
  return {"dense": {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(16,)), jnp.bfloat16)},
          "embed": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)}


def _state(seed: float = 0.0) -> dict:
  return {"params": _params(seed), "step": jnp.asarray(int(seed), jnp.int32)}


def _shardings(tree, mesh, spec_2d):
  """spec_2d for matrices, replicated for the rest."""
  return jax.tree.map(lambda x: NamedSharding(mesh, spec_2d if x.ndim == 2 else P()), tree)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _bits(tree) -> list[bytes]:
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _replicated(tree):
  mesh = jax.make_mesh((8,), ("data",))
  return _abstract(tree, jax.tree.map(lambda _: NamedSharding(mesh, P()), tree))


def test_round_trip_is_bitwise_onto_another_mesh(tmp_path):
  def trained_once(params):  # jitted: one compile, not one per eager op
    state = TrainState.create(params=params, tx=optax.adamw(1e-3), rng=jax.random.key(3))
    return state.apply_gradients(jax.tree.map(jnp.ones_like, params), optax.adamw(1e-3))

  state = jax.jit(trained_once)(_params(1))
  save_mesh = jax.make_mesh((4, 2), ("data", "tensor"))
  state = jax.device_put(state, _shardings(state, save_mesh, P("data", "tensor")))
  data_state = {"grain": {"next_index": 17, "epoch": 2, "name": "x"}, "counts": [1, 2, 3.5]}
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    assert ckpt.save(1, state, data_state)

  load_mesh = jax.make_mesh((2, 4), ("a", "b"))
  shardings = _shardings(state, load_mesh, P(None, "b"))
  with Checkpointer(tmp_path) as ckpt:
    restored, restored_data = ckpt.restore(_abstract(state, shardings))
  assert isinstance(restored, TrainState)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert _bits(restored) == _bits(state)
  for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    assert x.sharding == s
  assert restored_data == data_state


def test_restores_typed_keys(tmp_path):
  state = {"rng": jax.random.key(7), "w": jnp.arange(8.0)}
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, {})
  with Checkpointer(tmp_path) as ckpt:
    restored, _ = ckpt.restore(_replicated(state))
  np.testing.assert_array_equal(jax.random.key_data(restored["rng"]),
                                jax.random.key_data(state["rng"]))


def test_keep_n_and_every_m_with_force(tmp_path):
  with Checkpointer(tmp_path, save_every=3, keep=2) as ckpt:
    saved = [ckpt.save(s, _state(s), {"step": s}) for s in range(1, 11)]
    assert saved == [s % 3 == 0 for s in range(1, 11)]
    assert ckpt.save(9, _state(9), {"step": 9}, force=True) is False  # already saved
    assert ckpt.save(10, _state(10), {"step": 10}, force=True)
    assert ckpt.should_save(12) and not ckpt.should_save(11)
    ckpt.wait()
    assert ckpt.all_steps() == [9, 10]
  assert sorted(os.listdir(tmp_path)) == ["10", "9"]


def test_restores_latest_or_the_step_asked(tmp_path):
  with Checkpointer(tmp_path, keep=None) as ckpt:
    for s in (1, 2, 3):
      ckpt.save(s, _state(s), {"step": s})
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 3
    abstract = _replicated(_state())
    state, data = ckpt.restore(abstract)
    assert data == {"step": 3} and _bits(state) == _bits(_state(3))
    state, data = ckpt.restore(abstract, step=2)
    assert data == {"step": 2} and _bits(state) == _bits(_state(2))
    with pytest.raises(CheckpointError, match=r"step 5 .* steps \[1, 2, 3\]"):
      ckpt.restore(abstract, step=5)


def test_leftover_temporary_folder_is_ignored_and_removed(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _state(1), {"step": 1})
  for name in ("2.orbax-checkpoint-tmp", "3.orbax-checkpoint-tmp-1700000000"):  # new, old
    leftover = tmp_path / name  # the folder of a save interrupted halfway
    shutil.copytree(tmp_path / "1", leftover)
    (leftover / "commit_success.txt").unlink(missing_ok=True)
    shutil.rmtree(leftover / "data")
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    state, data = ckpt.restore(_replicated(_state()))
    assert data == {"step": 1} and _bits(state) == _bits(_state(1))
    assert ckpt.save(2, _state(2), {"step": 2})
    ckpt.wait()
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.restore(_replicated(_state()))[1] == {"step": 2}


_KILLED_CHILD = """
import os, signal, sys
import jax.numpy as jnp
from train.engine.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1])
state = lambda v: {"w": jnp.full((2048, 2048), v, jnp.float32), "step": jnp.asarray(v, jnp.int32)}
ckpt.save(1, state(1), {"step": 1})
ckpt.wait()
ckpt.save(2, state(2), {"step": 2})  # async: returns while the files are being written
print("finalized" if os.path.isdir(os.path.join(sys.argv[1], "2")) else "in flight", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_hard_kill_during_async_save_resumes_from_last_complete(tmp_path):
  env = {**os.environ, "PYTHONPATH": REPO}
  child = subprocess.run([sys.executable, "-c", _KILLED_CHILD, str(tmp_path)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
  assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
  assert child.stdout.strip() == "in flight"
  abstract = _replicated({"w": jnp.zeros((2048, 2048)), "step": jnp.zeros((), jnp.int32)})
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    state, data = ckpt.restore(abstract)
    assert data == {"step": 1} and int(state["step"]) == 1
    assert np.all(np.asarray(state["w"]) == 1)
    assert ckpt.save(2, jax.tree.map(lambda x: x + 1, state), {"step": 2})  # the run goes on
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # the interrupted save's folder is gone
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1, 2] and ckpt.restore(abstract)[1] == {"step": 2}


_CRASHING_CHILD = """
import os, sys
os.cpu_count = lambda: 16  # as on a big host, where orbax would delete old steps with threads
import jax.numpy as jnp
from train.engine.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], keep=1)
ckpt.save(1, {"w": jnp.full((1024, 1024), 1.0)}, {"step": 1})
ckpt.wait()
ckpt.save(2, {"w": jnp.full((1024, 1024), 2.0)}, {"step": 2})  # and step 1 to delete after it
raise SystemExit("the loop failed while the save was in flight")  # no close()
"""


def test_exit_without_close_finishes_the_pending_save(tmp_path):
  env = {**os.environ, "PYTHONPATH": REPO}
  child = subprocess.run([sys.executable, "-c", _CRASHING_CHILD, str(tmp_path)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
  assert child.returncode == 1 and child.stderr.strip().endswith("in flight"), child.stderr
  assert os.listdir(tmp_path) == ["2"]
  with Checkpointer(tmp_path) as ckpt:
    state, data = ckpt.restore(_replicated({"w": jnp.zeros((1024, 1024))}))
  assert data == {"step": 2} and np.all(np.asarray(state["w"]) == 2)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax, on damage
def test_restore_errors_name_the_problem(tmp_path):
  state = _state(1)
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
      ckpt.restore(_replicated(state))
    ckpt.save(1, state, {})
    ckpt.save(2, state, {})
    ckpt.wait()
    grown = _replicated({**state, "extra": state["step"]})
    with pytest.raises(CheckpointError, match="not in the checkpoint: extra"):
      ckpt.restore(grown)
    wider = _replicated({**state, "params": {**state["params"], "embed": jnp.zeros((4, 9))}})
    with pytest.raises(CheckpointError, match=r"params/embed \(4, 8\) saved, \(4, 9\) expected"):
      ckpt.restore(wider)
    with pytest.raises(ValueError, match="sharding"):
      ckpt.restore(jax.eval_shape(lambda: state))
    with pytest.raises(TypeError, match="dict"):
      ckpt.save(3, state, [1, 2])


def _damage(step_dir):
  """Truncates every array data file of a step to half its size, as a full disk would."""
  files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and "d" in f.parts]
  assert files
  for data_file in files:
    data_file.write_bytes(data_file.read_bytes()[:data_file.stat().st_size // 2])


def test_an_unreadable_latest_checkpoint_is_set_aside_for_the_one_before(tmp_path, caplog):
  with Checkpointer(tmp_path, keep=None) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _state(step), {"step": step})
    ckpt.wait()
    _damage(tmp_path / "3")
    _damage(tmp_path / "2")
    with caplog.at_level("WARNING"):
      state, data = ckpt.restore(_replicated(_state(0)))
    assert _bits(state) == _bits(_state(1)) and data == {"step": 1}
    assert "3 cannot be read" in caplog.text and "resuming from step 1" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == [
        "1", "2.damaged", "3.damaged"]
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    assert ckpt.save(2, _state(2), {"step": 2})  # the step is trained and saved again
    ckpt.wait()
    assert _bits(ckpt.restore(_replicated(_state(0)))[0]) == _bits(_state(2))
    _damage(tmp_path / "2")  # again: set aside under a name not taken yet
    assert ckpt.restore(_replicated(_state(0)))[1] == {"step": 1}
  names = sorted(p.name for p in tmp_path.iterdir())
  assert names == ["1", "2.damaged", "2.damaged-1", "3.damaged"]
  Checkpointer(tmp_path).close()  # A folder with set-aside steps is still a checkpoint folder.


def test_no_readable_checkpoint_is_an_error_that_moves_nothing(tmp_path):
  with Checkpointer(tmp_path, keep=None) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _state(step), {})
    ckpt.wait()
    for step in (1, 2):
      _damage(tmp_path / str(step))
    with pytest.raises(CheckpointError, match=r"No checkpoint in .* can be read: The checkpoint "
                       r".*2 cannot be read .*; The checkpoint .*1 cannot be read"):
      ckpt.restore(_replicated(_state(0)))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == ["1", "2"]


def _delete_array_files(step_dir):
  for data_file in [f for f in (step_dir / "state").rglob("*") if f.is_file() and "d" in f.parts]:
    data_file.unlink()


def _garble(path):
  path.write_text(path.read_text()[:len(path.read_text()) // 2])  # JSON cut short


def _garble_array_metadata(step_dir):
  for manifest in (step_dir / "state").rglob("manifest.*"):
    manifest.write_bytes(manifest.read_bytes()[:manifest.stat().st_size // 2])


_DAMAGE = {
    "array files cut short": _damage,
    "array files missing": _delete_array_files,
    "array manifest cut short": _garble_array_metadata,
    "tree metadata garbled": lambda step_dir: _garble(step_dir / "state" / "_METADATA"),
    "data state garbled": lambda step_dir: _garble(next((step_dir / "data").iterdir())),
    "data item missing": lambda step_dir: shutil.rmtree(step_dir / "data"),
    "state item missing": lambda step_dir: shutil.rmtree(step_dir / "state"),
}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax, on damage
@pytest.mark.parametrize("damage", _DAMAGE.values(), ids=_DAMAGE.keys())
def test_each_kind_of_damage_sets_the_step_aside(tmp_path, damage):
  with Checkpointer(tmp_path, keep=None) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _state(step), {"step": step})
  damage(tmp_path / "2")
  with Checkpointer(tmp_path) as ckpt:
    state, data = ckpt.restore(_replicated(_state(0)))
  assert _bits(state) == _bits(_state(1)) and data == {"step": 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2.damaged"]


def _raising(error):
  def fail(*args, **kwargs):
    raise error
  async def fail_async(*args, **kwargs):
    raise error
  return fail, fail_async


_NOT_DAMAGE = {  # what reading an intact checkpoint can meet
    "out of memory": jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4194304 bytes."),
    "disk error": OSError(errno.EIO, "Input/output error"),
    "permission": PermissionError(errno.EACCES, "Permission denied"),
    "timeout": TimeoutError("The read operation timed out"),
    "storage unavailable": ValueError(  # tensorstore's form of a transient GCS error
        "UNAVAILABLE: Error reading \"gs://bucket/run/checkpoints/2/state/d/0\": HTTP 503"),
}


@pytest.mark.parametrize("error", _NOT_DAMAGE.values(), ids=_NOT_DAMAGE.keys())
@pytest.mark.parametrize("reading", ["arrays", "metadata"])
def test_a_failure_that_is_not_damage_moves_nothing_and_the_rerun_resumes(
    tmp_path, monkeypatch, error, reading):
  with Checkpointer(tmp_path, keep=None) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _state(step), {"step": step})
  fail, fail_async = _raising(error)
  with monkeypatch.context() as patch:
    if reading == "arrays":
      patch.setattr(ocp.type_handlers.ArrayHandler, "deserialize", fail_async)
    else:
      patch.setattr(ocp.StandardCheckpointHandler, "metadata", fail)
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointReadError) as raised:
      ckpt.restore(_replicated(_state(0)))
  message = str(raised.value)
  assert f"{tmp_path / '2'} could not be loaded: {type(error).__name__}: " in message
  assert str(error).split(":")[0] in message and "Nothing was moved" in message
  assert raised.value.__cause__ is error  # its traceback is kept
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
  with Checkpointer(tmp_path) as ckpt:  # the rerun, the cause gone
    state, data = ckpt.restore(_replicated(_state(0)))
  assert _bits(state) == _bits(_state(2)) and data == {"step": 2}


def test_refuses_folders_that_are_not_checkpoint_folders(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(CheckpointError, match="not a checkpoint folder.*checkpoints, config.json"):
    Checkpointer(tmp_path)
  with pytest.raises(CheckpointError, match="is a file"):
    Checkpointer(tmp_path / "config.json")
  with pytest.raises(ValueError, match="save_every"):
    Checkpointer(tmp_path / "checkpoints", save_every=0)


def test_load_params_from_workdir_folder_or_step(tmp_path):
  folder = tmp_path / "run" / "checkpoints"
  with Checkpointer(folder) as ckpt:
    for s in (1, 2):
      ckpt.save(s, {**_state(s), "opt_state": _params(9)}, {})
  latest = checkpoint.load_params(tmp_path / "run")
  assert isinstance(latest["embed"], np.ndarray)
  assert _bits(latest) == _bits(_params(2))
  assert _bits(checkpoint.load_params(folder)) == _bits(_params(2))
  mesh = jax.make_mesh((2, 4), ("a", "b"))
  shardings = _shardings(_params(), mesh, P("a", None))
  first = checkpoint.load_params(folder / "1", _abstract(_params(), shardings))
  assert _bits(first) == _bits(_params(1))
  assert all(x.sharding == s for x, s in zip(jax.tree.leaves(first), jax.tree.leaves(shardings)))


def test_load_params_from_the_tree_file_alone_equals_orbaxs_full_metadata(tmp_path, monkeypatch):
  with Checkpointer(tmp_path / "checkpoints") as ckpt:
    ckpt.save(3, {**_state(3), "opt_state": {"mu": _params(7), "count": jnp.zeros((), jnp.int32)}},
              {})
  step_dir = checkpoint._find_step_dir(checkpoint._absolute(tmp_path))
  keys = checkpoint_metadata.saved_params_keys(step_dir / "state")
  assert keys == jax.tree.map(lambda _: 0, _params())
  fast = checkpoint.load_params(tmp_path)
  monkeypatch.setattr(checkpoint_metadata, "saved_params_keys", lambda _: None)  # orbax's metadata
  full = checkpoint.load_params(tmp_path)
  assert jax.tree.structure(fast) == jax.tree.structure(full)
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(full)):
    assert type(a) is type(b) is np.ndarray and a.dtype == b.dtype and a.shape == b.shape
  assert _bits(fast) == _bits(full) == _bits(_params(3))


def test_a_tree_file_of_another_form_falls_back_to_the_full_metadata(tmp_path):
  with Checkpointer(tmp_path / "checkpoints") as ckpt:
    ckpt.save(1, _state(1), {})
  step_dir = checkpoint._find_step_dir(checkpoint._absolute(tmp_path))
  metadata = step_dir / "state" / "_METADATA"
  original = metadata.read_text()
  for other in ('{"tree": {}}', "[1, 2]", "not json"):
    metadata.write_text(other)
    assert checkpoint_metadata.saved_params_keys(metadata.parent) is None
  metadata.write_text(original.replace('"key_type": 2', '"key_type": 1'))
  assert checkpoint_metadata.saved_params_keys(metadata.parent) is None


def test_load_params_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.load_params(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="No complete checkpoint"):
    checkpoint.load_params(tmp_path / "empty")
  with Checkpointer(tmp_path / "checkpoints") as ckpt:
    ckpt.save(1, _state(1), {})
  other = {**_params(), "head": jnp.zeros((3,)), "embed": jnp.zeros((5, 8))}
  del other["dense"]["bias"]
  with pytest.raises(CheckpointError) as error:
    checkpoint.load_params(tmp_path, jax.eval_shape(lambda: other))
  message = str(error.value)
  assert "not in the checkpoint: params/head" in message
  assert "not in the model: params/dense/bias" in message
  assert "params/embed (4, 8) saved, (5, 8) expected" in message


def _wait_for(condition) -> bool:
  deadline = time.monotonic() + 5
  while not condition() and time.monotonic() < deadline:
    time.sleep(0.01)
  return condition()


def test_preemption_guard_turns_sigterm_into_a_flag():
  received = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  try:
    with PreemptionGuard() as guard:
      assert not guard.should_stop(0)
      os.kill(os.getpid(), signal.SIGTERM)
      assert _wait_for(guard.should_stop)
      assert guard.received == signal.SIGTERM and guard.should_stop(1)
    assert received == []  # the guard's handler ran, not the previous one
    os.kill(os.getpid(), signal.SIGTERM)  # the previous handler is back
    assert _wait_for(lambda: received == [signal.SIGTERM])
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_preemption_guard_second_sigint_interrupts():
  before = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    with PreemptionGuard() as guard:
      os.kill(os.getpid(), signal.SIGINT)
      assert _wait_for(guard.should_stop)
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(5)
  assert signal.getsignal(signal.SIGINT) is before
