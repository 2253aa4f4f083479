"""Training and using tapete's models. The commands are this folder's modules; what they
share lives in three sub-packages.

Commands (each module's docstring holds its flags):
  python -m train                 train an experiment, or resume it: --config=FILE --workdir=DIR
  python -m train.generate        answer from a trained workdir, in batches
  python -m train.evaluate        evaluate a saved run without training it
  python -m train.export          write a trained run as a Hugging Face folder
  python -m train.attention_maps  draw one input's attention as per-head heatmaps
  python -m train.assets          build the named assets a config points to (asset:NAME)

Sub-packages:
  engine/  the training machinery: loop, tasks and losses, optimizer, what trains, state,
           checkpoints, device mesh, metrics
  run/     a config and a workdir made into a run and back: config, experiment files, inputs and
           tokenizers, the trained workdir, the commands' error path and start-up
  data/    the data library: sources, local files, tokenizers, grain pipelines, packing
"""
