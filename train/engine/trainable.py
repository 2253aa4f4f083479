"""What trains, and from what: `init_from`, freezing and LoRA, owned by one `Trainable` per run.

  config.init_from = "ckpt:WORKDIR"  the params of another run's latest checkpoint
                   | "hf:FOLDER"     a Hugging Face checkpoint (models.pretrained.import_hf); the
                                     model config is then FOLDER/config.json, and config.model
                                     may only set fields that keep the shapes (dropout, dtype...)
  config.optim.freeze = regexes      params whose "/" path matches (re.search) are frozen
  config.lora.enabled                the state's params are {"base": the model's, "lora":
                                     adapters (models/lora.py)}; the base is frozen except the
                                     params `lora.train` names (a new head)

Restoring copies every model parameter the source holds at the same "/" path; the others (a
new task head) keep their seeded initialisation and are logged by name, and so are source
parameters the model has no place for (a pretraining head the task does not use), which are
skipped. A shape mismatch, or a source that shares no parameter with the model, is an error.
The source is read once per run (`read_source`), before the model is built, and only where its
params are needed: a run resuming from its own checkpoint reads none (an adapter-only one reads
the base); an hf:FOLDER's model then comes from the copy of its config the workdir keeps
(train/run/hf_copy.py). Once restored onto the devices, the host copy of the source is dropped.

Frozen params get no gradient (stop_gradient: no weight gradients are computed for them) and
no optimizer state, and stay bitwise unchanged. A frozen parameter that was freshly initialised
(not restored) would stay random: that is an error. With `lora.adapter_only_checkpoint`,
checkpoints hold only what trains (adapters, `lora.train` params, optimizer state, step, rng);
resuming and train.generate rebuild the base from `init_from`.
"""

import dataclasses
import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from models import lora, paths, pretrained
from models.errors import InputError
from models.config import TransformerConfig
from train.engine import checkpoint, parallel
from train.engine.metrics import say
from train.run import config as config_lib, hf_copy

HEADS = {"classify": "classifier", "mlm": "mlm"}  # import_hf's head for our task models


# ---------------------------------------------------------------------------------------------
# init_from, read once.


@dataclasses.dataclass(frozen=True)
class Source:
  """The parameters `config.init_from` names, as host numpy arrays by "/" path."""
  origin: str                               # config.init_from
  params: dict[str, np.ndarray]
  initialised: frozenset[str] = frozenset()  # paths the import initialised itself (new heads)
  model_cfg: TransformerConfig | None = None  # hf: the folder's model


def read_source(init_from: str, task: str, model, seed: int, workdir: str | None = None,
                adapter_only: bool = False) -> Source | None:
  """The params `init_from` names, read from disk once (an hf:FOLDER imported for `task` with
  the config's `model` section and `seed` for new heads); None without one, or when `workdir`
  holds checkpoints with the params (all of them: not `adapter_only`)."""
  if not init_from or (workdir and not adapter_only and _has_checkpoint(workdir)):
    return None
  kind, path = init_from.split(":", 1)
  if kind == "ckpt":
    return Source(init_from, paths.flatten(run_params(path)))
  imported = pretrained.import_hf(
      path, head=HEADS.get(task), num_classes=model.num_classes or None,
      pooling=model.pooling, rng=seed, **config_lib.hf_overrides(model))
  return Source(init_from, paths.flatten(imported.params), imported.initialised,
                imported.module.cfg)


def _has_checkpoint(workdir: str) -> bool:
  folder = os.path.join(workdir, "checkpoints")
  return os.path.isdir(folder) and bool(ocp.utils.checkpoint_steps(folder))


def pretrained_model(init_from: str, model, workdir: str | None, source: Source | None
                     ) -> TransformerConfig | None:
  """init_from=hf:FOLDER's model: the import's, else read from the workdir's copy of its config
  (FOLDER's, with its weights read only to learn whether its output is tied, before a copy is
  made); None for other runs."""
  if not init_from.startswith("hf:"):
    return None
  if source is not None:
    return source.model_cfg
  return pretrained.hf_config(hf_copy.folder(init_from, workdir),
                              tie_output=hf_copy.tie_output(init_from, workdir),
                              **config_lib.hf_overrides(model))


def run_params(path: str) -> dict:
  """The model params of another run's latest checkpoint (a LoRA run's adapters merged in)."""
  saved = checkpoint.load_params(path)
  if not (isinstance(saved, dict) and set(saved) == {"base", "lora"}):
    return saved
  run_config = _run_config(path)
  if run_config["lora"]["adapter_only_checkpoint"]:
    raise InputError(f"ckpt:{path} holds only LoRA adapters (adapter_only_checkpoint): start "
                     f"from its base ({run_config['init_from']}) with the same lora settings.")
  cfg = _lora_config(run_config["lora"])
  return jax.tree.map(np.asarray, lora.merge(saved["base"], saved["lora"], cfg))


def _run_config(path: str) -> dict:
  """config.json of the run whose workdir, checkpoints/ or step folder `path` is."""
  for folder in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    file = os.path.join(folder, "config.json")
    if os.path.isfile(file):
      with open(file) as f:
        return json.load(f)
  raise InputError(f"ckpt:{path} is a LoRA run but its config.json (for lora.alpha) is not "
                   "found: pass the run's workdir.")


def _lora_config(c) -> lora.LoraConfig | None:
  """The LoraConfig of a config's `lora` section, None when LoRA is off."""
  if not c["enabled"]:
    return None
  return lora.LoraConfig(targets=c["targets"], rank=c["rank"], alpha=float(c["alpha"]))


# ---------------------------------------------------------------------------------------------
# The trainable parameters of a run.


class Trainable:
  """The layout of the state's params, what trains in it, what the model sees, what is saved.

  Built once per run from the model, its init inputs, the config's `lora` section (as
  `lora_settings`) and optim.freeze, and the `init_from` source; `read_source` (None without an
  init_from) reads that source at the start where the run has not read it before.
  """

  def __init__(self, model, init_inputs: tuple, lora_settings, freeze: tuple[str, ...] = (),
               source: Source | None = None,
               read_source: Callable[[], Source] | None = None):
    self.model, self.init_inputs, self.source = model, init_inputs, source
    self.lora_settings, self.freeze, self.read_source = lora_settings, freeze, read_source
    self.lora = _lora_config(lora_settings)
    self.adapter_only = bool(lora_settings.adapter_only_checkpoint)
    self.abstract_params = parallel.unbox(jax.eval_shape(self.init, jax.random.key(0)))
    self.mask = self._mask(paths.param_paths(self.abstract_params))
    if source is not None:  # Refused before anything compiles.
      model, mask = ((self.abstract_params, self.mask) if self.lora is None else
                     (self.abstract_params["base"], self.mask["base"]))
      check_source(source, {p: x.shape for p, x in paths.flatten(model).items()},
                   paths.flatten(mask))

  def init(self, rng) -> Any:
    """The (boxed) params a run starts from: the model's, plus fresh adapters with LoRA."""
    params = self.model.init(rng, *self.init_inputs)["params"]
    if self.lora is None:
      return params
    return {"base": params, "lora": lora.init(jax.random.fold_in(rng, 1), params, self.lora)}

  def _mask(self, names) -> Any:
    """A Python bool per state param: False where frozen."""
    if self.lora is None:
      patterns = paths.patterns(self.freeze)
      mask = jax.tree.map(lambda name: not any(re.search(p, name) for p in patterns), names)
      paths.check_matched("optim.freeze pattern", patterns, jax.tree.leaves(names))
      if patterns and not any(jax.tree.leaves(mask)):
        raise InputError(f"optim.freeze patterns {list(patterns)} freeze every parameter: "
                         "nothing would train; narrow the patterns.")
      return mask
    patterns = paths.patterns(self.lora_settings.train)
    model_names = [n[len("base/"):] for n in jax.tree.leaves(names) if n.startswith("base/")]
    paths.check_matched("lora.train pattern", patterns, model_names)
    return jax.tree.map(lambda name: name.startswith("lora/") or any(
        re.search(p, name[len("base/"):]) for p in patterns), names)

  @property
  def num_params(self) -> tuple[int, int]:
    """(all params of the state, those that train)."""
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_params)]
    return sum(sizes), sum(s for s, train in zip(sizes, jax.tree.leaves(self.mask)) if train)

  # --- Training.

  def optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` applied to the trainable params; frozen ones get zero updates and no state."""
    if all(jax.tree.leaves(self.mask)):
      return tx
    labels = jax.tree.map(lambda train: "trainable" if train else "frozen", self.mask)
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)

  def model_params(self, params) -> Any:
    """What the model is applied to: frozen leaves behind stop_gradient (no weight gradients
    are built for them), and with LoRA the base merged with its adapters."""
    params = jax.tree.map(lambda x, train: x if train else jax.lax.stop_gradient(x),
                          params, self.mask)
    return params if self.lora is None else lora.merge(params["base"], params["lora"], self.lora)

  # --- Starting and resuming.

  def start(self, checkpointer: checkpoint.Checkpointer, state, shardings):
    """(state, data iterator state) to train from: the latest checkpoint's (an adapter-only
    one laid over the base that `init_from` rebuilds), else `state` with `init_from` restored
    into it and no data state."""
    if self.read_source and (checkpointer.latest_step() is None or self.adapter_only):
      # A source not read at build time (its checkpoints proved unusable) is read now.
      self.source = self.source or self.read_source()
      state = state.replace(params=self._initialise(state.params))
      self.source = None  # On the devices now: the host copy (an 8B model's 32 GB) is freed.
    if checkpointer.latest_step() is None:
      return state, None
    restored, data_state = checkpointer.restore(jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        self.saved_view(state), self.saved_view(shardings)))
    if self.adapter_only:
      restored = restored.replace(params=_overlay(state.params, restored.params))
    return restored, data_state

  def _initialise(self, params) -> Any:
    """The state's params (sharded arrays) with everything the source holds restored."""
    if self.lora is None:
      return restore(params, self.source, self.mask)
    return {"base": restore(params["base"], self.source, self.mask["base"]),
            "lora": params["lora"]}

  def saved_view(self, state):
    """What a checkpoint holds of a TrainState (or of its shardings)."""
    if not self.adapter_only:
      return state
    return state.replace(params=_subset(state.params, self.mask))

  # --- Inference.

  def trained_params(self, workdir: str) -> Any:
    """The model params of the run in `workdir` (with LoRA: merged), ready to apply."""
    if not self.adapter_only:
      return self.model_params(checkpoint.load_params(workdir, self.abstract_params))
    saved = checkpoint.load_params(workdir, _subset(self.abstract_params, self.mask))
    frozen = paths.flatten(_subset(self.abstract_params, jax.tree.map(
        lambda train: not train, self.mask)))
    base = {name[len("base/"):]: s for name, s in frozen.items()}
    missing = sorted(base.keys() - self.source.params.keys())
    if missing:
      raise InputError(f"{workdir} holds only adapters and {self.source.origin} lacks the frozen "
                       f"{paths.listing(missing)}: has init_from changed since training?")
    base = {n: np.asarray(self.source.params[n]).astype(s.dtype) for n, s in base.items()}
    return self.model_params(_overlay({"base": paths.unflatten(base)}, saved))


def _subset(tree, mask) -> dict:
  """The leaves of a nested dict where `mask` is True, as a nested dict."""
  keep = paths.flatten(mask)
  return paths.unflatten({n: x for n, x in paths.flatten(tree).items() if keep[n]})


def _overlay(tree, part) -> dict:
  """`tree` with the leaves of `part` (a subset of its paths) put in."""
  return paths.unflatten({**paths.flatten(tree), **paths.flatten(part)})


def restore(params, source: Source, mask) -> Any:
  """`params` (sharded arrays) with every leaf of `source` at the same path copied in."""
  origin, target, src = source.origin, paths.flatten(params), source.params
  check_source(source, {p: x.shape for p, x in target.items()}, paths.flatten(mask))
  shared = target.keys() & src.keys()
  initialised = source.initialised & shared
  fresh = (target.keys() - src.keys()) | initialised
  unused = src.keys() - target.keys()
  say(f"Restored {len(shared - initialised)} parameters from {origin}.")
  if fresh:
    say(f"Initialised, not in {origin}: {paths.listing(fresh)}.")
  if unused:
    say(f"Skipped, in {origin} but not in the model: {paths.listing(unused)}.")
  restored = {p: x if p not in src or p in initialised else jax.device_put(
      np.asarray(src[p]).astype(x.dtype), x.sharding) for p, x in target.items()}
  return paths.unflatten(restored)


def check_source(source: Source, shapes: dict[str, tuple], train: dict[str, bool]) -> None:
  """Refuses a source whose params differ in shape from the model's (`shapes`, by "/" path),
  one that shares none with it, and one that leaves a frozen param (`train` False) fresh."""
  origin, src = source.origin, source.params
  shared = shapes.keys() & src.keys()
  misshapen = [f"{p} {tuple(np.shape(src[p]))} (the model's: {tuple(shapes[p])})"
               for p in sorted(shared) if tuple(np.shape(src[p])) != tuple(shapes[p])]
  if misshapen:
    raise InputError(f"init_from={origin}: parameters of another shape: "
                     f"{paths.listing(misshapen)}. Set the model config to the source's.")
  if not shared:
    raise InputError(f"init_from={origin} shares no parameter with the model (paths like "
                     f"{sorted(src)[:2]}; the model's like {sorted(shapes)[:2]}): is it a model "
                     "of this task's family?")
  fresh = (shapes.keys() - src.keys()) | (source.initialised & shared)
  frozen_fresh = [p for p in fresh if not train[p]]
  if frozen_fresh:
    raise InputError(f"{paths.listing(frozen_fresh)} would stay at their random initialisation: "
                     f"they are not in {origin} and are frozen. Train them (lora.train) or "
                     "unfreeze them (optim.freeze).")
