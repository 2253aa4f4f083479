"""Low-rank adapters (LoRA, Hu et al. 2021) as functions of the parameters, not of the modules.

    cfg = LoraConfig(targets=r"self_attention/(query|value)/kernel", rank=8, alpha=16.0)
    adapters = lora.init(rng, params, cfg)          # params boxed: model.init(...)["params"]
    logits = model.apply({"params": lora.merge(nn.unbox(params), adapters, cfg)}, tokens)

The model code stays unchanged: a targeted kernel W is replaced by W + (alpha / rank) · a @ b.
Any DenseGeneral kernel is a matrix over (input axes) x (output axes): the query kernel
[D, N, H] is D x (N·H), the attention output kernel [N, H, D] is (N·H) x D. Its adapter is

    a  [*layers, *in, rank]   random, uniform in ±1/sqrt(fan_in) (PEFT's default)
    b  [*layers, rank, *out]  zeros, so a model with fresh adapters equals its base

where a leading "layers" axis (`scan_layers`) gives each layer its own adapter. The split is
read from the kernel's logical axis names (the residual "embed" axis is the input when it
comes first, the output when it comes last); a plain 2-D kernel needs no names.

Cost of merging in the train step (`merge` inside the loss): each targeted kernel is rebuilt
(in·out·rank flops, one transient copy) and its full gradient dW is formed before it is
projected onto a and b, as full fine-tuning would for that kernel; untargeted frozen kernels
get no weight gradient at all (the loop stops their gradients). The saving is the optimizer:
Adam keeps moments for rank·(in + out) numbers per kernel instead of in·out, and only the
adapters need a checkpoint. Computing x·W + s·(x·a)·b inside the modules would avoid dW, at the
price of touching every attention and MLP module; at fine-tuning sizes dW is not the bottleneck.
Merged parameters are also what inference uses: `merge` once, then decode as usual.
"""

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import paths
from models.errors import InputError

BATCH_AXES = ("layers",)
ADAPTABLE = ("kernel", "embedding")  # the last name of a parameter LoRA may adapt


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which kernels get adapters (regexes, re.search over "/"-joined paths), rank and alpha."""
  targets: str | tuple[str, ...]
  rank: int = 8
  alpha: float = 16.0

  def __post_init__(self):
    patterns = self.patterns
    problems = []
    if not patterns:
      problems.append("targets is empty: give a regex over parameter paths, e.g. "
                      r"'self_attention/(query|value)/kernel'")
    problems += paths.pattern_problems("target", patterns)
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      problems.append(f"rank must be a positive integer, got {self.rank!r}")
    if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
        or not math.isfinite(self.alpha) or self.alpha <= 0):
      problems.append(f"alpha must be a finite number > 0, got {self.alpha!r}")
    if problems:
      raise InputError("Invalid LoRA config: " + "; ".join(problems) + ".")

  @property
  def patterns(self) -> tuple[str, ...]:
    return paths.patterns(self.targets)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def targets(params, cfg: LoraConfig) -> list[str]:
  """The paths of the kernels `cfg.targets` selects; a pattern matching nothing is an error."""
  flat = paths.flatten(params)
  names = list(flat)
  paths.check_matched("lora target", cfg.patterns, names,
                      like=[p for p in names if p.endswith("kernel")][:3])
  chosen = [path for path in names if any(re.search(p, path) for p in cfg.patterns)]
  others = [path for path in chosen
            if path.rsplit("/", 1)[-1] not in ADAPTABLE or len(_shape(flat[path])) < 2]
  if others:
    raise InputError(f"lora targets {list(cfg.patterns)} select parameters that are not kernels: "
                     f"{others[:5]}; LoRA adapts kernels (and embedding tables), so end the "
                     "pattern with /kernel.")
  return chosen


def _value(leaf):
  """The array (or ShapeDtypeStruct) inside a partitioning box."""
  return leaf.value if isinstance(leaf, nn.meta.AxisMetadata) else leaf


def _shape(leaf) -> tuple[int, ...]:
  return tuple(_value(leaf).shape)


def _names(leaf) -> tuple | None:
  return tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else None


def split_axes(path: str, shape: tuple[int, ...], names: tuple | None) -> tuple[int, int]:
  """(number of leading batch axes, number of input axes) of a kernel; the rest are outputs."""
  if names is None:
    if len(shape) == 2:
      return 0, 1
    raise ValueError(f"lora cannot tell the input axes of {path} {shape} without its logical "
                     "axis names: pass the boxed params of model.init (or jax.eval_shape of it), "
                     "not unboxed ones.")
  batch = 0
  while batch < len(names) and names[batch] in BATCH_AXES:
    batch += 1
  rest = names[batch:]
  if len(rest) == 2:
    return batch, 1
  if len(rest) > 2 and rest[0] == "embed":
    return batch, 1
  if len(rest) > 2 and rest[-1] == "embed":
    return batch, len(rest) - 1
  raise InputError(f"lora cannot split {path} with axes {names} into inputs and outputs: "
                   "target 2-D kernels, or kernels with 'embed' first or last.")


def init(rng: jax.Array, params, cfg: LoraConfig) -> dict:
  """Fresh adapters {path...: {"a", "b"}} for the targeted kernels of `params`.

  `params` may be arrays or `jax.ShapeDtypeStruct`s (only shapes and names are read); when its
  leaves carry logical axis names the adapters carry them too (the rank axis unsharded).
  """
  flat = paths.flatten(params)
  chosen = targets(params, cfg)
  adapters = {}
  for key, path in zip(jax.random.split(rng, len(chosen)), chosen):
    leaf = flat[path]
    shape, names = _shape(leaf), _names(leaf)
    batch, num_in = split_axes(path, shape, names)
    dtype = _value(leaf).dtype
    a_shape = shape[:batch + num_in] + (cfg.rank,)
    b_shape = shape[:batch] + (cfg.rank,) + shape[batch + num_in:]
    bound = 1.0 / math.sqrt(math.prod(shape[batch:batch + num_in]))
    a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound).astype(dtype)
    b = jnp.zeros(b_shape, dtype)
    if names is not None:
      a = nn.LogicallyPartitioned(a, names[:batch + num_in] + (None,))
      b = nn.LogicallyPartitioned(b, names[:batch] + (None,) + names[batch + num_in:])
    adapters[f"{path}/a"], adapters[f"{path}/b"] = a, b
  return paths.unflatten(adapters)


def delta(a, b, kernel_shape: tuple[int, ...]) -> jax.Array:
  """a @ b over (batch, input axes) x (output axes), shaped as the kernel, in float32."""
  batch = a.ndim + b.ndim - 2 - len(kernel_shape)
  rank = a.shape[-1]
  a_2d = a.reshape(a.shape[:batch] + (-1, rank)).astype(jnp.float32)
  b_2d = b.reshape(b.shape[:batch] + (rank, -1)).astype(jnp.float32)
  return jnp.matmul(a_2d, b_2d, precision=jax.lax.Precision.HIGHEST).reshape(kernel_shape)


def merge(params, adapters, cfg: LoraConfig) -> dict:
  """The model's params with W + (alpha / rank) · a @ b for every adapted kernel (unboxed)."""
  flat = paths.flatten(nn.meta.unbox(params))
  for path, pair in _pairs(adapters).items():
    if path not in flat:
      raise InputError(f"lora adapter {path} has no kernel in the params: adapters and params "
                       "come from different models.")
    kernel = flat[path]
    flat[path] = (kernel.astype(jnp.float32) + cfg.scale * delta(
        pair["a"], pair["b"], kernel.shape)).astype(kernel.dtype)
  return paths.unflatten(flat)


def _pairs(adapters) -> dict[str, dict]:
  """{kernel path: {"a", "b"}} of an adapter tree."""
  pairs = {}
  for path, leaf in paths.flatten(nn.meta.unbox(adapters)).items():
    kernel, name = path.rsplit("/", 1)
    pairs.setdefault(kernel, {})[name] = leaf
  return pairs
