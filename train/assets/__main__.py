"""Builds assets and prints their folders: python -m train.assets [shakespeare|gpt2|t5|bert|NAME ...]."""

import sys

from train import assets
from train.run import cli

SHORT_NAMES = {"shakespeare": "shakespeare_genres", "gpt2": "tiny_gpt2", "t5": "tiny_t5",
               "bert": "tiny_bert"}


def main(names: list[str]) -> None:
  for name in names or ["shakespeare"]:
    print(assets.folder(SHORT_NAMES.get(name, name)))


if __name__ == "__main__":
  cli.guarded(main)(sys.argv[1:])
