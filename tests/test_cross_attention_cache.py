"""Encoder-decoder decoding projects the encoded input to cross-attention keys and values once,
keeps them in the cache, and no decode step projects them again. (That decoding still equals
full forward passes, greedy and beam, is tested in test_decoding.py and against transformers'
T5 in test_generate.py.)"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import decoding
from test_decoding import Seq2Seq, build


def projections(paths, attention, name):
  return {p for p in paths if p.endswith(f"{attention}/{name}")}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["t5", "base_scanned"])
def test_cross_keys_and_values_are_projected_once_and_kept_in_the_cache(name):
  model = build(Seq2Seq, name)
  source, mask = jnp.asarray(model.source), jnp.asarray(model.mask)
  called = {"prepare": set(), "step": set()}  # Module paths, recorded while jit traces.
  phase = ["prepare"]

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      called[phase[0]].add("/".join(context.module.path))
    return next_fun(*args, **kwargs)

  @jax.jit
  def prepare_and_step():
    tokens_to_logits, cache, first_B = decoding.prepare_encoder_decoder(
        model.module, model.params, source, encoder_padding_mask_BS=mask, decoder_start_id=0,
        max_new_tokens=3)
    phase[0] = "step"
    tokens_to_logits(first_B[:, None], cache)
    return cache, model.module.apply({"params": model.params}, source,
                                     encoder_padding_mask=mask, method="encode")

  with nn.intercept_methods(record):
    cache, encoded_BSD = prepare_and_step()
  for projection in ("key", "value"):
    assert projections(called["prepare"], "cross_attention", projection)
    assert not projections(called["step"], "cross_attention", projection)
  assert projections(called["step"], "cross_attention", "query")
  assert projections(called["step"], "self_attention", "key")

  # The kept keys: the encoder output times the key kernel, in numpy.
  decoder_params = nn.unbox(model.params)["decoder"]
  if name == "base_scanned":  # Layers stacked on axis 0 of the params, axis 1 of the cache.
    kernel_DKH = decoder_params["layers"]["cross_attention"]["key"]["kernel"][1]
    kept_BKSH = cache["decoder"]["layers"]["cross_attention"]["cached_key"][:, 1]
  else:
    kernel_DKH = decoder_params["layers_1"]["cross_attention"]["key"]["kernel"]
    kept_BKSH = cache["decoder"]["layers_1"]["cross_attention"]["cached_key"]
  want_BSKH = np.einsum("bsd,dkh->bskh", np.asarray(encoded_BSD, np.float64),
                        np.asarray(kernel_DKH, np.float64))
  if name == "base_scanned":
    want_BSKH += np.asarray(decoder_params["layers"]["cross_attention"]["key"]["bias"][1])
  np.testing.assert_allclose(np.swapaxes(kept_BKSH, 1, 2), want_BSKH, rtol=1e-5, atol=1e-5)


def test_a_cross_cache_of_another_shape_is_one_clear_error():
  model = build(Seq2Seq, "t5")
  source, mask = jnp.asarray(model.source), jnp.asarray(model.mask)

  def step_with_a_shorter_encoded_input():
    _, cache, first_B = decoding.prepare_encoder_decoder(
        model.module, model.params, source, encoder_padding_mask_BS=mask, decoder_start_id=0,
        max_new_tokens=3)
    encoded_BSD = model.module.apply({"params": model.params}, source,
                                     encoder_padding_mask=mask, method="encode")
    return model.module.apply({"params": model.params, "cache": cache}, encoded_BSD[:, :4],
                              first_B[:, None], decode=True, method="decode", mutable=["cache"])

  with pytest.raises(ValueError, match="do not fit the cross-attention cache"):
    jax.eval_shape(step_with_a_shorter_encoded_input)
