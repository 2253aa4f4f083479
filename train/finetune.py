"""Fine-tuning: start from other weights (`init_from`), train a part of them (freezing, LoRA).

  config.init_from = "ckpt:WORKDIR"  the params of another run's latest checkpoint
                   | "hf:FOLDER"     a Hugging Face checkpoint (models.pretrained.from_hf); the
                                     model config is then FOLDER/config.json, and config.model
                                     may only set fields that keep the shapes (dropout, dtype...)

Restoring copies every model parameter the source holds at the same "/" path; the others (a
new task head) keep their seeded initialisation and are logged by name, and so are source
parameters the model has no place for (a pretraining head the task does not use), which are
skipped. A shape mismatch, or a source that shares no parameter with the model, is an error.

Training a part: `optim.freeze` (regexes over param paths) or `config.lora`. With LoRA the
state's params are {"base": the model's params, "lora": adapters (models/lora.py)}; the base
is frozen except the params `lora.train` names (a new head), and the train step runs the
model on `lora.merge(base, adapters)`. Frozen params get no gradient (stop_gradient: no weight
gradients are computed for them) and no optimizer state, and stay bitwise unchanged. A frozen
parameter that was freshly initialised (not restored) would stay random: that is an error.
With `lora.adapter_only_checkpoint`, checkpoints hold only what trains (adapters, `lora.train`
params, optimizer state, step, rng); resuming and `train.generate` rebuild the base from
`init_from`.
"""

import json
import os
import re
from typing import Any

from flax import traverse_util
import jax
import numpy as np
import optax

from models import lora, pretrained
from train import checkpoint, config as config_lib, optim

HEADS = {"classify": "classifier", "mlm": "mlm"}  # from_hf's head for our task models
_MAX_LISTED = 12


def say(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)


def lora_config(config) -> lora.LoraConfig | None:
  """The LoraConfig of `config.lora`, None when LoRA is off."""
  if not config.lora.enabled:
    return None
  return lora.LoraConfig(targets=config.lora.targets, rank=config.lora.rank,
                         alpha=float(config.lora.alpha))


# ---------------------------------------------------------------------------------------------
# The params of the train state, and what trains.


def init_params(model, config, rng, *inputs) -> Any:
  """The (boxed) params a run starts from: the model's, plus fresh adapters with LoRA."""
  params = model.init(rng, *inputs)["params"]
  cfg = lora_config(config)
  if cfg is None:
    return params
  return {"base": params, "lora": lora.init(jax.random.fold_in(rng, 1), params, cfg)}


def model_params(params, lora_cfg: lora.LoraConfig | None) -> Any:
  """What the model is applied to: the params, or with LoRA the base merged with its adapters."""
  return params if lora_cfg is None else lora.merge(params["base"], params["lora"], lora_cfg)


def trainable(params, config) -> Any:
  """A tree of Python bools over the state's params: False where frozen."""
  paths = optim.param_paths(params)
  if lora_config(config) is None:
    patterns = _patterns(config.optim.freeze)
    return jax.tree.map(lambda path: not any(re.search(p, path) for p in patterns), paths)
  patterns = _patterns(config.lora.train)
  model_paths = [path[len("base/"):] for path in jax.tree.leaves(paths) if path.startswith("base/")]
  for pattern in patterns:
    if not any(re.search(pattern, path) for path in model_paths):
      raise ValueError(f"lora.train pattern {pattern!r} matches no model parameter (a typo?); "
                       f"paths look like {model_paths[-3:]}.")
  return jax.tree.map(lambda path: path.startswith("lora/") or any(
      re.search(p, path[len("base/"):]) for p in patterns), paths)


def _patterns(patterns) -> tuple[str, ...]:
  return (patterns,) if isinstance(patterns, str) else tuple(patterns or ())


def stop_frozen_gradients(params, mask) -> Any:
  """`params` with the frozen leaves behind stop_gradient: their weight gradients are never built."""
  return jax.tree.map(lambda x, train: x if train else jax.lax.stop_gradient(x), params, mask)


def make_optimizer(config, params, mask) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """config.optim's optimizer; with LoRA, applied to the trainable leaves of `mask` only."""
  tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps, params)
  if lora_config(config) is None:
    return tx, schedule  # optim.freeze is handled by optim itself.
  labels = jax.tree.map(lambda train: "trainable" if train else "frozen", mask)
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels), schedule


# ---------------------------------------------------------------------------------------------
# Adapter-only checkpoints: the part of the state that trains.


def subset(tree, mask) -> dict:
  """The leaves of a nested dict where `mask` is True, as a nested dict."""
  flat, keep = traverse_util.flatten_dict(tree), traverse_util.flatten_dict(mask)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if keep[k]})


def overlay(tree, part) -> dict:
  """`tree` with the leaves of `part` (a subset of its paths) put in."""
  flat = traverse_util.flatten_dict(tree)
  flat.update(traverse_util.flatten_dict(part))
  return traverse_util.unflatten_dict(flat)


def saved_view(config, state, mask):
  """What a checkpoint holds of a TrainState (or of its shardings)."""
  if not config.lora.adapter_only_checkpoint:
    return state
  return state.replace(params=subset(state.params, mask))


def from_saved_view(config, state, restored):
  """The full state from a restored `saved_view`; `state` holds the rebuilt frozen params."""
  if not config.lora.adapter_only_checkpoint:
    return restored
  return restored.replace(params=overlay(state.params, restored.params))


# ---------------------------------------------------------------------------------------------
# init_from.


def initialise_from(config, params, mask) -> Any:
  """The state's params (sharded arrays) with everything `config.init_from` holds restored."""
  source, fresh_in_source = source_params(config)
  if lora_config(config) is None:
    return restore(params, source, mask, config.init_from, fresh_in_source)
  base = restore(params["base"], source, mask["base"], config.init_from, fresh_in_source)
  return {"base": base, "lora": params["lora"]}


def source_params(config) -> tuple[dict, set[str]]:
  """(params of init_from as numpy, paths among them that from_hf initialised itself)."""
  kind, path = config.init_from.split(":", 1)
  if kind == "ckpt":
    return run_params(path), set()
  fields = config_lib.hf_overrides(config)
  load = lambda rng: pretrained.from_hf(
      path, head=HEADS.get(config.task), num_classes=config.model.num_classes or None,
      pooling=config.model.pooling, rng=rng, **fields)[1]
  params = load(config.seed)
  if config.task != "classify":
    return params, set()
  # A classifier's pooler and output layer come from the file when it has them; from_hf
  # initialises them otherwise, which shows as kernels that change with its rng.
  flat, other = _flat(params), _flat(load(config.seed + 1))
  fresh_modules = {p.rsplit("/", 1)[0] for p, x in flat.items() if not np.array_equal(x, other[p])}
  return params, {p for p in flat if p.rsplit("/", 1)[0] in fresh_modules}


def run_params(path: str) -> dict:
  """The model params of another run's latest checkpoint (a LoRA run's adapters merged in)."""
  saved = checkpoint.load_params(path)
  if not (isinstance(saved, dict) and set(saved) == {"base", "lora"}):
    return saved
  run_config = _run_config(path)
  if run_config["lora"]["adapter_only_checkpoint"]:
    raise ValueError(f"ckpt:{path} holds only LoRA adapters (adapter_only_checkpoint): start "
                     f"from its base ({run_config['init_from']}) with the same lora settings.")
  cfg = lora.LoraConfig(targets=run_config["lora"]["targets"], rank=run_config["lora"]["rank"],
                        alpha=float(run_config["lora"]["alpha"]))
  return jax.tree.map(np.asarray, lora.merge(saved["base"], saved["lora"], cfg))


def _run_config(path: str) -> dict:
  """config.json of the run whose workdir, checkpoints/ or step folder `path` is."""
  for folder in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    file = os.path.join(folder, "config.json")
    if os.path.isfile(file):
      with open(file) as f:
        return json.load(f)
  raise ValueError(f"ckpt:{path} is a LoRA run but its config.json (for lora.alpha) is not "
                   "found: pass the run's workdir.")


def _flat(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def _listing(paths) -> str:
  paths = sorted(paths)
  more = f" and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
  return ", ".join(paths[:_MAX_LISTED]) + more


def restore(params, source, mask, origin: str, fresh_in_source=frozenset()) -> Any:
  """`params` (sharded arrays) with every leaf of `source` at the same path copied in."""
  target, src, train = _flat(params), _flat(source), _flat(mask)
  shared = target.keys() & src.keys()
  misshapen = [f"{p} {tuple(np.shape(src[p]))} (the model's: {tuple(target[p].shape)})"
               for p in sorted(shared) if tuple(np.shape(src[p])) != tuple(target[p].shape)]
  if misshapen:
    raise ValueError(f"init_from={origin}: parameters of another shape: {_listing(misshapen)}. "
                     "Set the model config to the source's.")
  if not shared:
    raise ValueError(f"init_from={origin} shares no parameter with the model (paths like "
                     f"{sorted(src)[:2]}; the model's like {sorted(target)[:2]}): is it a model "
                     "of this task's family?")
  fresh = (target.keys() - src.keys()) | (fresh_in_source & shared)
  unused = src.keys() - target.keys()
  say(f"Restored {len(shared) - len(fresh_in_source & shared)} parameters from {origin}.")
  if fresh:
    say(f"Initialised, not in {origin}: {_listing(fresh)}.")
  if unused:
    say(f"Skipped, in {origin} but not in the model: {_listing(unused)}.")
  frozen_fresh = sorted(p for p in fresh if not train[p])
  if frozen_fresh:
    raise ValueError(f"{_listing(frozen_fresh)} would stay at their random initialisation: they "
                     f"are not in {origin} and are frozen. Train them (lora.train) or unfreeze "
                     "them (optim.freeze).")
  restored = {p: x if p not in src or p in fresh_in_source else jax.device_put(
      np.asarray(src[p]).astype(x.dtype), x.sharding) for p, x in target.items()}
  return traverse_util.unflatten_dict(restored, sep="/")


# ---------------------------------------------------------------------------------------------
# A trained run's params, for inference.


def load_params(config, workdir: str, abstract_params, mask) -> Any:
  """The model params of the run in `workdir` (with LoRA: merged), ready to apply.

  `abstract_params`: the state's params as ShapeDtypeStructs; `mask`: `trainable` of them. An
  adapter-only checkpoint is laid over the base rebuilt from init_from.
  """
  lora_cfg = lora_config(config)
  if not config.lora.adapter_only_checkpoint:
    return model_params(checkpoint.load_params(workdir, abstract_params), lora_cfg)
  saved = checkpoint.load_params(workdir, subset(abstract_params, mask))
  source = _flat(source_params(config)[0])
  wanted = _flat(subset(abstract_params["base"], jax.tree.map(lambda t: not t, mask["base"])))
  missing = sorted(wanted.keys() - source.keys())
  if missing:
    raise ValueError(f"{workdir} holds only adapters and {config.init_from} lacks the frozen "
                     f"{_listing(missing)}: has init_from changed since training?")
  frozen = {p: np.asarray(source[p]).astype(s.dtype) for p, s in wanted.items()}
  params = overlay({"base": traverse_util.unflatten_dict(frozen, sep="/")}, saved)
  return model_params(params, lora_cfg)
