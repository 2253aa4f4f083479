"""How a run lays out an example's tokens, checked against transformers' T5."""

import numpy as np
import pytest

from train.run import inputs as inputs_lib, run_tokenizers


@pytest.mark.pretrained
def test_t5_decoder_inputs_are_the_labels_shifted_as_transformers_does(t5_config, tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  folder = t5_config.init_from[len("hf:"):]
  inputs = inputs_lib.make_inputs(t5_config.task, t5_config.data, t5_config.seed,
                                  t5_config.init_from, str(tmp_path))
  batch = next(iter(inputs.eval_pipeline(8, pack=False)))
  real = batch["weights"] > 0
  assert real.sum() > 8  # Rows of several target tokens each.
  labels = torch.tensor(np.where(real, batch["decoder_targets"], -100), dtype=torch.long)
  model = transformers.T5ForConditionalGeneration.from_pretrained(folder)
  expected = model.prepare_decoder_input_ids_from_labels(labels=labels).numpy()
  np.testing.assert_array_equal(batch["decoder_inputs"][real], expected[real])
  assert set(batch["decoder_inputs"][:, 0]) == {model.config.decoder_start_token_id} == {0}
  assert run_tokenizers.decoder_start_id(t5_config.init_from, inputs.target_tokenizer) == 0

