"""Builds assets and prints their folders: python -m train.assets [shakespeare|gpt2|t5|bert|NAME ...]."""

import sys

from train import assets

SHORT_NAMES = {"shakespeare": "shakespeare_genres", "gpt2": "tiny_gpt2", "t5": "tiny_t5",
               "bert": "tiny_bert"}


def main(names: list[str]) -> int:
  try:
    for name in names or ["shakespeare"]:
      print(assets.folder(SHORT_NAMES.get(name, name)))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
