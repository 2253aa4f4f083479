"""Checkpoints of a run: save, restore and resume with orbax; params for `init_from`.

A checkpoint is DIR/<step>/ holding two orbax items: `state` (the TrainState pytree,
arrays written shard by shard) and `data` (JSON: the data iterator's state). Saves are
asynchronous: `save` returns once the arrays are copied off the devices, a thread writes
them to DIR/<step>.orbax-checkpoint-tmp-<time>/ and renames that to DIR/<step>/ when every
file is written (on GCS a commit_success.txt file marks it complete instead). A process
killed at any moment therefore leaves every finished step intact and at worst a temporary
folder, which `latest_step` ignores and the next `Checkpointer` on DIR deletes.

    with Checkpointer(workdir + "/checkpoints", save_every=500, keep=3) as ckpt:
      if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(abstract_state)  # ShapeDtypeStructs + shardings
      with preemption.PreemptionGuard() as guard:
        for ...:
          stop = guard.should_stop(step)
          ckpt.save(step, state, data_state, force=stop or last)
          if stop: break
    # leaving the `with` waits for the last save to finish

Anything found that cannot be used (a folder that is not a checkpoint folder, a damaged
checkpoint, a state whose tree or shapes differ from the model's) raises CheckpointError
naming it: a run never starts afresh over, or silently past, existing checkpoints. A step
that fails to load for any other cause (out of memory, a storage outage, a bug) raises
CheckpointReadError and moves nothing: the rerun after the fix resumes from it.
"""

import contextlib
import dataclasses
import json
import logging
import os
import re
import threading
from typing import Any

from etils import epath
import jax
import numpy as np
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from models import paths
from models.errors import InputError, MissingInputError
from train.engine import checkpoint_metadata, event_loops
from train.engine.records import STEP_NAME

STATE = "state"
DATA = "data"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_DAMAGED = re.compile(r"^(0|[1-9]\d*)\.damaged(-\d+)?$")  # a step folder set aside, unreadable
_ORBAX_ROOT_FILES = ("metadata", "_ROOT_METADATA")
# Old steps deleted in the save's own thread: orbax's default on many cores starts threads to
# delete each, which fail when a save is finished at exit on Python 3.12
# (train/engine/event_loops.py).
_ONE_DELETION_THREAD = ({"num_deletion_threads": 1} if "num_deletion_threads" in {
    f.name for f in dataclasses.fields(ocp.CheckpointManagerOptions)} else {})


class CheckpointError(InputError):
  """A checkpoint folder or checkpoint that cannot be used as asked."""


class DamagedCheckpointError(CheckpointError):
  """A checkpoint whose files cannot be read (truncated, garbled, missing)."""

  def __init__(self, message: str, step_dir: epath.Path | None = None, reason: str = ""):
    super().__init__(message)
    self.step_dir = step_dir
    self.reason = reason or message  # what is wrong, without what to do about it


class CheckpointReadError(RuntimeError):
  """A checkpoint that failed to load for a cause other than damage; nothing was moved."""


class Checkpointer:
  """Async orbax checkpoints of (state, data_state): every `save_every` steps, `keep` kept."""

  def __init__(self, directory: str | os.PathLike, *, save_every: int = 1,
               keep: int | None = 3, async_save: bool = True):
    if save_every < 1:
      raise ValueError(f"save_every must be a positive number of steps, got {save_every}.")
    if keep is not None and keep < 1:
      raise ValueError(f"keep must be a positive number of checkpoints (or None: all), got {keep}.")
    self.directory = _absolute(directory)
    self.save_every = save_every
    _check_checkpoint_folder(self.directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        should_save_fn=lambda step, _: step % save_every == 0,  # and at preemption sync points
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
        **_ONE_DELETION_THREAD)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._closed = False
    # A process that ends without `close` (an exception in the loop) must still finish its
    # last save: Python runs these hooks before it stops the thread pools orbax writes with
    # (a plain `atexit` hook runs after, and the save then stalls for minutes and is lost).
    threading._register_atexit(self.close)  # pylint: disable=protected-access
    event_loops.install_threadless_exit()  # and finish it where the exit starts no thread (3.12)

  def latest_step(self) -> int | None:
    """The newest checkpoint's step (or one this process is writing), None if none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` without force writes a checkpoint."""
    return step not in self._manager.all_steps() and self._manager.should_save(step)

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    """Starts saving `state` and `data_state` as `step` when due (or forced); True if it did.

    A step already saved is not written again (so a forced final save right after a
    periodic one is a no-op). The write goes on in the background; `wait` or `close`
    block until it is complete.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    _check_json(data_state)
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                 DATA: ocp.args.JsonSave(data_state)})
    return self._manager.save(step, args=args, force=force)

  @event_loops.settled_loops()  # a damaged file's failed read leaves no others running
  def restore(self, abstract_state: Any, *, step: int | None = None) -> tuple[Any, dict]:
    """(state, data_state) of `step` (default: the latest readable), laid out as `abstract_state`.

    `abstract_state` is the state's tree of `jax.ShapeDtypeStruct`s (or arrays) with a
    `.sharding` each, e.g. `jax.eval_shape` of the init plus the run's shardings: the arrays
    come back with those shardings, whatever mesh wrote them. Without `step`, a latest
    checkpoint that is damaged (`_is_damage`) is set aside (renamed STEP.damaged, never
    deleted) with a warning naming it, and the one before it restored; if none can be read,
    DamagedCheckpointError is raised and nothing is moved. Any other failure (out of memory, a
    transient storage error) raises CheckpointReadError naming the step, and moves nothing.
    """
    self._manager.wait_until_finished()
    steps = self.all_steps()
    abstract_state = checkpoint_metadata.abstract_tree(abstract_state, require_sharding=True)
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"No checkpoint of step {step} in {self.directory}; it holds "
                              f"steps {steps}.")
      return self._restore(step, abstract_state)
    if not steps:
      raise MissingInputError(f"No checkpoint to restore in {self.directory}.")
    damaged = []
    for step in reversed(steps):
      try:
        restored, error = self._restore(step, abstract_state), None
      except (DamagedCheckpointError, CheckpointReadError) as e:
        restored, error = None, e
      outcome = _worst_on_hosts(_outcome(error))  # every host restores the same step, or stops
      if outcome == _FAILED:
        raise error if isinstance(error, CheckpointReadError) else CheckpointReadError(
            f"Step {step} in {self.directory} could not be restored on another process (see its "
            "error); nothing was moved. Rerun once the cause is fixed to resume from it.")
      if outcome == _RESTORED:
        break
      step_dir = self.directory / str(step)
      damaged.append(error or DamagedCheckpointError(
          f"The checkpoint {step_dir} cannot be read on another host", step_dir))
    else:
      raise DamagedCheckpointError(
          f"No checkpoint in {self.directory} can be read: " + "; ".join(
              e.reason for e in damaged) + ". Use a new workdir.")
    for error in damaged:
      aside = _free_name(error.step_dir.parent / f"{error.step_dir.name}.damaged")
      logging.warning("%s. Set aside as %s; resuming from step %d instead.",
                      error.reason, aside, step)
      if jax.process_index() == 0:
        error.step_dir.rename(aside)
    if damaged:
      multihost_utils.sync_global_devices("tapete: damaged checkpoints set aside")
      self._manager.reload()
    return restored

  def _restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    step_dir = self.directory / str(step)
    with _reading(step_dir):
      missing = [item for item in (STATE, DATA) if not (step_dir / item).is_dir()]
    if missing:
      raise _damaged(step_dir, f"no {' or '.join(missing)} item in it")
    _check_tree_matches(abstract_state, _saved_tree(step_dir), step_dir,
                        fix="resume with the configuration that wrote it, or use a new workdir")
    args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                 DATA: ocp.args.JsonRestore()})
    with _reading(step_dir):
      restored = self._manager.restore(step, args=args)
    return restored[STATE], restored[DATA]

  def wait(self) -> None:
    """Blocks until the pending save, if any, is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes the pending save and releases orbax's threads (also done at exit)."""
    if not self._closed:
      self._closed = True
      self._manager.wait_until_finished()
      # orbax's close leaves the clean-up of earlier runs' tmp folders, started with the manager,
      # running: a process that ends soon after (an error) then prints its failure at exit.
      getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
      self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


@event_loops.settled_loops()
def load_params(path: str | os.PathLike, abstract_params: Any = None) -> Any:
  """The params of another run's latest checkpoint, for `init_from` (optimizer state unread).

  `path`: a run's workdir, its checkpoints/ folder, or one step folder in it.
  `abstract_params`: the model's params as `jax.ShapeDtypeStruct`s (or arrays); leaves with
  a `.sharding` come back as arrays with it, leaves without as numpy arrays. The tree and
  shapes must match the checkpoint's (dtypes are cast). None: numpy arrays as saved.
  """
  step_dir = _find_step_dir(_absolute(path))
  keys = None if abstract_params is not None else checkpoint_metadata.saved_params_keys(
      step_dir / STATE)
  if keys is not None:
    item = {"params": keys}
    return _restore_params(step_dir, item, jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item))
  saved = _saved_tree(step_dir)
  if not isinstance(saved, dict) or "params" not in saved:
    raise CheckpointError(f"{step_dir} holds no params: not a checkpoint of "
                          "train.engine.checkpoint.")
  if abstract_params is None:
    abstract_params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                   saved["params"])
  else:
    abstract_params = checkpoint_metadata.abstract_tree(abstract_params, require_sharding=False)
    _check_tree_matches({"params": abstract_params}, {"params": saved["params"]}, step_dir,
                        fix="set the model config to the one that wrote it")
  item = {"params": abstract_params}
  return _restore_params(step_dir, item, ocp.checkpoint_utils.construct_restore_args(item))


def _restore_params(step_dir: epath.Path, item: dict, restore_args: Any) -> Any:
  """The params of STEP_DIR/state laid out as `item` with `restore_args`."""
  args = ocp.args.PyTreeRestore(item=item, partial_restore=True, restore_args=restore_args)
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    with _reading(step_dir):
      return checkpointer.restore(step_dir / STATE, args=args)["params"]
  finally:
    checkpointer.close()


def _absolute(path: str | os.PathLike) -> epath.Path:
  path = os.fspath(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


def _check_checkpoint_folder(directory: epath.Path) -> None:
  """Refuses a path that is a file, or a folder holding anything but orbax checkpoints."""
  if not directory.exists():
    return
  if not directory.is_dir():
    raise CheckpointError(f"The checkpoint folder {directory} is a file; pass a folder.")
  foreign = sorted(p.name for p in directory.iterdir()
                   if not (STEP_NAME.match(p.name) or _TMP_SUFFIX in p.name
                           or _DAMAGED.match(p.name)
                           or p.name in _ORBAX_ROOT_FILES or p.name.startswith(".")))
  if foreign:
    raise CheckpointError(
        f"{directory} is not a checkpoint folder: it holds {paths.listing(foreign)}. Pass an empty "
        "or new folder (a run's checkpoints go to WORKDIR/checkpoints), or move those away.")


def _check_json(data_state: Any) -> None:
  if not isinstance(data_state, dict):
    raise TypeError(f"data_state must be a dict (the data iterator's get_state()), got "
                    f"{type(data_state).__name__}.")
  try:
    json.dumps(data_state)
  except (TypeError, ValueError) as e:
    raise TypeError(f"data_state must be JSON-serializable: {e}.") from e


def _find_step_dir(path: epath.Path) -> epath.Path:
  """The step folder meant by PATH: itself, or the latest one in PATH[/checkpoints]."""
  if not path.exists():
    raise MissingInputError(f"No checkpoint at {path}: the path does not exist.")
  if (path / STATE).is_dir():
    return path
  folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  steps = ocp.utils.checkpoint_steps(folder)
  if not steps:
    raise CheckpointError(
        f"No complete checkpoint in {folder}. Pass a run's workdir, its checkpoints/ folder, "
        "or one step folder in it.")
  return folder / str(max(steps))


def _saved_tree(step_dir: epath.Path) -> Any:
  """The saved state's tree of array metadata (shape, dtype) from STEP_DIR/state."""
  if not (step_dir / STATE).is_dir():
    raise CheckpointError(f"{step_dir} holds no '{STATE}' item: it was not written by "
                          "train.engine.checkpoint, or is damaged.")
  with _reading(step_dir):
    return checkpoint_metadata.saved_tree(step_dir / STATE)


def _check_tree_matches(abstract: Any, saved: Any, step_dir: epath.Path, *, fix: str) -> None:
  """Raises CheckpointError listing leaves missing, unexpected or of another shape."""
  problems = checkpoint_metadata.tree_mismatches(abstract, saved)
  if problems:
    raise CheckpointError(f"The checkpoint {step_dir} does not match: " + "; ".join(problems)
                          + f". {fix[0].upper()}{fix[1:]}.")


@contextlib.contextmanager
def _reading(step_dir: epath.Path):
  """Raises a failure to read STEP_DIR as DamagedCheckpointError if it is damage (`_is_damage`),
  else as CheckpointReadError; CheckpointErrors pass unchanged."""
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:
    raise (_damaged(step_dir, e) if _is_damage(e) else _unreadable(step_dir, e)) from e


# What says that a checkpoint's files are missing, garbled, or fail their checks: nothing else
# sets a step aside, for a step set aside is progress lost (see _is_damage).
_DAMAGE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                  json.JSONDecodeError, UnicodeDecodeError)
_DAMAGE_STATUS = re.compile(r"^(DATA_LOSS|NOT_FOUND|OUT_OF_RANGE): ")


def _is_damage(error: BaseException) -> bool:
  """Whether `error`, or an error it was raised from, says the checkpoint itself is damaged.

  Damage is a file missing (FileNotFoundError, tensorstore's NOT_FOUND), in place of a folder
  or the reverse (IsADirectoryError, NotADirectoryError), cut short (tensorstore's OUT_OF_RANGE:
  a read past its end), or garbled (tensorstore's DATA_LOSS: bytes that fail to decode or their
  checksum; json.JSONDecodeError, UnicodeDecodeError: a metadata or data-state file that is not
  JSON). Not damage: out of memory (RESOURCE_EXHAUSTED), every other OSError (EIO, EACCES,
  ENOSPC, timeouts: the storage's state, not the files'; a rerun or a fix finds them intact),
  tensorstore's UNAVAILABLE, DEADLINE_EXCEEDED, PERMISSION_DENIED and the like, and bugs.
  """
  while error is not None:
    if isinstance(error, _DAMAGE_ERRORS) or _DAMAGE_STATUS.match(str(error)):
      return True
    error = error.__cause__
  return False


def _cause(error: Any) -> str:
  """The first line of an error's message, without tensorstore's long spec."""
  return str(error).split(" [tensorstore_spec=")[0].splitlines()[0][:300]


def _damaged(step_dir: epath.Path, error: Any) -> DamagedCheckpointError:
  """The error for a damaged step: names it, the cause, and the step to fall back on."""
  older = []
  if STEP_NAME.match(step_dir.name):
    older = sorted(s for s in ocp.utils.checkpoint_steps(step_dir.parent) if s < int(step_dir.name))
  fix = (f"Move {step_dir} away to resume from step {older[-1]}, or use a new workdir."
         if older else "Use another checkpoint or a new workdir.")
  reason = f"The checkpoint {step_dir} cannot be read ({_cause(error)})"
  return DamagedCheckpointError(f"{reason}. {fix}", step_dir, reason)


def _unreadable(step_dir: epath.Path, error: Exception) -> CheckpointReadError:
  """The error for a step that failed to load for another cause than damage."""
  return CheckpointReadError(
      f"The checkpoint {step_dir} could not be loaded: {type(error).__name__}: {_cause(error)}. "
      "Nothing was moved: rerun once the cause is fixed to resume from it (should the cause be "
      "damage after all, move the step away to resume from the one before).")


def _free_name(path: epath.Path) -> epath.Path:
  """`path`, or `path-N` for the first N that does not exist yet."""
  n, name = 0, path
  while name.exists():
    n += 1
    name = path.parent / f"{path.name}-{n}"
  return name


_RESTORED, _DAMAGED_STEP, _FAILED = 0, 1, 2  # a restore's outcomes, worst last


def _outcome(error: Exception | None) -> int:
  if error is None:
    return _RESTORED
  return _DAMAGED_STEP if isinstance(error, DamagedCheckpointError) else _FAILED


def _worst_on_hosts(outcome: int) -> int:
  """The worst of every process's outcome (they must agree on the step they restore)."""
  if jax.process_count() == 1:
    return outcome
  return int(np.max(multihost_utils.process_allgather(np.asarray(outcome, np.int32))))
