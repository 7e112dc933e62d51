"""Data loader throughput: tokens per second that one process's ``zjax.data.loader`` loader reads.

Run: .venv/bin/python benchmarks/data.py [--batch 32] [--seq 128] [--batches 200] [--repeats 3]

The stdlib corpus (8 MB, as ``zjax train`` reads it), shuffled windows, one process
reading a whole global batch (P=1) or its half (P=2, the rows of process 0), with
grain prefetch threads off (0) and on (2). Prints the median over ``--repeats`` runs
of ``--batches`` batches, after one warm-up batch that starts the threads. Nothing
here runs on a device: it is the host-side cost a training step has to hide.
"""
import argparse
import statistics
import sys
import time

from zjax.config.schema import DataConfig
from zjax.data.loader import make_loader, token_datasets
from zjax.train.loop import MAX_CORPUS_BYTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("$ python " + " ".join(sys.argv))

    t0 = time.perf_counter()
    windows = token_datasets(DataConfig(seq_len=args.seq), max_bytes=MAX_CORPUS_BYTES)["train"]
    print(f"stdlib train split: {len(windows):,} windows of {args.seq + 1} tokens, "
          f"built in {time.perf_counter() - t0:.1f} s; global batch {args.batch}")
    print(f"{'processes':>9}  {'prefetch':>8}  {'rows/batch':>10}  {'batches/s':>9}  {'tokens/s':>11}")
    for processes in (1, 2):
        for prefetch in (0, 2):
            rates = []
            for repeat in range(args.repeats):
                loader = make_loader(windows, args.batch, seed=repeat, prefetch=prefetch,
                                     process_index=0, process_count=processes)
                next(loader)
                start = time.perf_counter()
                for _ in range(args.batches):
                    next(loader)
                rates.append(args.batches / (time.perf_counter() - start))
                loader.close()
            rate = statistics.median(rates)
            rows = args.batch // processes
            print(f"{processes:>9}  {prefetch:>8}  {rows:>10}  {rate:>9.1f}  {rate * rows * args.seq:>11,.0f}")


if __name__ == "__main__":
    main()
