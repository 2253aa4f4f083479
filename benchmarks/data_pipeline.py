"""Tokens/s of the packed LM pipeline, with and without worker processes.

  .venv/bin/python -m benchmarks.data_pipeline [--seconds=15] [--workers=0,1,2]

Documents are generated pseudo-Portuguese text (Zipf-distributed made-up words
and num2words numbers), 20 to 4,000 characters long; the SentencePiece and the
byte-level BPE (`tokenizers`, GPT-2's kind) vocabularies have 2,000 entries;
rows are GPT-2 small's (batch 8 x 1024). "tokens/s" counts real (non-padding)
tokens delivered to the caller after warm-up (worker start-up and the first
batches excluded); "tok/main-cpu-s" divides them by the main process's CPU time
(all of the work when there are no workers). The last lines say how many host
cores would feed one H100 training GPT-2 small (about 450,000 tokens/s).
"""

import argparse
import math
import os
import tempfile
import time

import numpy as np
from num2words import num2words
from tokenizers import implementations

from train.data import pipeline, tokenizers

H100_GPT2_SMALL_TOKENS_PER_S = 450_000


def documents(num_docs: int, seed: int = 0) -> list[dict[str, str]]:
  """Zipf-distributed pseudo-Portuguese words, with numbers written out."""
  rng = np.random.default_rng(seed)
  syllables = ["ba", "ca", "de", "fi", "go", "la", "me", "ni", "po", "ra", "se",
               "tu", "va", "ção", "ões", "lho", "nha", "que", "gui", "ão", "em",
               "or", "es", "al", "ré", "mã", "pé"]
  lexicon = ["".join(rng.choice(syllables, rng.integers(1, 5)))
             for _ in range(30_000)]
  lexicon += [num2words(n, lang="pt") for n in range(2000)]
  zipf = 1.0 / np.arange(1, len(lexicon) + 1)
  zipf /= zipf.sum()
  docs = []
  for _ in range(num_docs):
    size = int(np.clip(rng.lognormal(6.5, 1.0), 20, 4000))
    words = rng.choice(len(lexicon), size // 5 + 1, p=zipf)
    docs.append({"text": " ".join(lexicon[w] for w in words)[:size]})
  return docs


def measure(source, tokenizer, *, workers: int, seconds: float, batch_size: int,
            seq_len: int) -> tuple[float, float, float]:
  """Real tokens per second and per CPU-second of this process, padding fraction.

  Measured over `seconds` after two warm-up batches.
  """
  it = iter(pipeline.lm_pipeline(
      source, tokenizer, batch_size=batch_size, seq_len=seq_len, seed=0,
      process_index=0, process_count=1, num_workers=workers))
  for _ in range(2):
    next(it)
  tokens = slots = 0
  start, cpu_start = time.perf_counter(), time.process_time()
  while time.perf_counter() - start < seconds:
    batch = next(it)
    tokens += int(batch["weights"].sum())
    slots += batch["weights"].size
  elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  it.close()
  return tokens / elapsed, tokens / cpu, 1 - tokens / slots


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seconds", type=float, default=15.0)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--docs", type=int, default=20_000)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=1024)
  args = parser.parse_args()
  source = documents(args.docs)
  texts = lambda: (d["text"] for d in source[:2000])
  with tempfile.TemporaryDirectory() as folder:
    spm = tokenizers.make_tokenizer(
        "sentencepiece", path=os.path.join(folder, "spm.model"), vocab_size=2000,
        texts=texts)
    bpe = implementations.ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts(), vocab_size=2000,
                            special_tokens=["<|endoftext|>"])
    bpe.save(os.path.join(folder, "tokenizer.json"))
    bpe = tokenizers.make_tokenizer("pretrained", path=folder)
  print(f"{os.cpu_count()} host cores, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
        f"{args.docs} documents, rows of {args.batch_size} x {args.seq_len}\n")
  print(f"{'tokenizer':<14} {'workers':>7} {'tokens/s':>10} "
        f"{'tok/main-cpu-s':>15} {'padding':>8}")
  per_core = {}
  for name, tokenizer in (("bytes", tokenizers.ByteTokenizer()),
                          ("sentencepiece", spm), ("bpe", bpe)):
    for workers in (int(w) for w in args.workers.split(",")):
      rate, cpu_rate, padding = measure(
          source, tokenizer, workers=workers, seconds=args.seconds,
          batch_size=args.batch_size, seq_len=args.seq_len)
      if workers == 0:  # All the work is in this process: its CPU time is the cost.
        per_core[name] = cpu_rate
      print(f"{name:<14} {workers:>7} {rate:>10,.0f} {cpu_rate:>15,.0f} "
            f"{padding:>8.1%}")
  print(f"\nOne H100 on GPT-2 small takes ~{H100_GPT2_SMALL_TOKENS_PER_S:,} tokens/s:")
  for name, rate in per_core.items():
    cores = H100_GPT2_SMALL_TOKENS_PER_S / rate
    print(f"  {name}: {rate:,.0f} tokens per CPU-second -> {cores:.2f} host cores "
          f"(with workers, plan {math.ceil(cores) + 1}: one more for the main "
          "process)")


if __name__ == "__main__":
  main()
