"""Input data: sources by name (`sources`: tfds, local files, numbers), tokenizers, grain pipelines."""
