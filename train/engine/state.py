"""The train state: step, parameters, optimizer state and the run's random key.

Every field is a pytree of arrays (no functions, no boxes), so the state can be donated to a
jitted step, sharded leaf by leaf (train/engine/parallel.py) and saved by orbax as it is.

The key is stored as raw `uint32` key data (`jax.random.key_data`), not as a typed key array:
raw integers checkpoint with every orbax version and restore without knowing the PRNG
implementation's dtype. `step_key()` wraps it back into a typed key. It is never split in
place: each step's key is `fold_in(key, step)`, so a resumed run draws the same numbers.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


def key_data(key: jax.Array) -> jax.Array:
  """Raw uint32 key data of a typed key (`jax.random.key`) or of raw data (`PRNGKey`)."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  if key.dtype != jnp.uint32:
    raise ValueError(f"A PRNG key must be a typed key or uint32 key data, got dtype {key.dtype}; "
                     "make one with jax.random.key(seed).")
  return jnp.asarray(key)


class TrainState(flax.struct.PyTreeNode):
  """step: int32 scalar; params and opt_state: plain pytrees; rng: uint32 key data."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array

  @classmethod
  def create(cls, *, params: Any, tx: optax.GradientTransformation,
             rng: jax.Array) -> "TrainState":
    """A state at step 0; `params` may still carry logical-partitioning boxes."""
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               rng=key_data(rng))

  def apply_gradients(self, grads: Any, tx: optax.GradientTransformation,
                      **extra_args) -> "TrainState":
    """One optimizer update with `tx` (the transformation that made `opt_state`); `extra_args`
    reach the transformations that take them (optim.clip_by_global_norm's `grad_norm`)."""
    updates, opt_state = optax.with_extra_args_support(tx).update(
        grads, self.opt_state, self.params, **extra_args)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state)

  def step_key(self) -> jax.Array:
    """This step's typed key, `fold_in(rng, step)`: split it for dropout and sampling."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
