"""Byte-level text batches from real text present on every machine: the Python stdlib.

Each ``.py`` file of the standard library goes to the train or the val split by a stable
hash of its relative path, so a file lands in the same split on every machine. A batch
is a deterministic function of ``(seed, split, step)``: step ``k`` of a resumed run sees
the batch it would have seen without the interruption.
"""
from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import numpy as np

from zjax.errors import ConfigError

VOCAB_SIZE = 256
SPLITS = ("train", "val")
FILE_SEPARATOR = b"\n\n"
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class TextCorpus:
    """Train and val byte streams (``np.uint8``) with deterministic random windows.

    Example:
      >>> corpus = TextCorpus.from_bytes(b"hello world " * 10, b"goodbye " * 10)
      >>> corpus.batch("train", step=0, batch_size=2, seq_len=8)["tokens"].shape
      (2, 9)
    """

    def __init__(self, train: np.ndarray, val: np.ndarray, files: dict[str, list[str]]):
        self.splits = {"train": train, "val": val}
        self.files = files

    @classmethod
    def stdlib(cls, val_fraction: float = 0.1, max_bytes: int | None = None,
               seed: int = 0) -> TextCorpus:
        """The bytes of the standard library's ``.py`` files, split by file.

        Args:
          val_fraction: share of files (by path hash) that go to val.
          max_bytes: cap on each split's size; files are read in sorted order until it.
          seed: salts the path hash, giving a different but equally stable split.

        Returns:
          A ``TextCorpus`` whose ``files`` lists the relative paths read per split.
        """
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"val_fraction={val_fraction!r} must lie strictly between 0 and 1")
        root = Path(sysconfig.get_paths()["stdlib"])
        chunks: dict[str, list[bytes]] = {s: [] for s in SPLITS}
        files: dict[str, list[str]] = {s: [] for s in SPLITS}
        sizes = dict.fromkeys(SPLITS, 0)
        for rel in stdlib_files(root):
            split = split_of(rel, val_fraction, seed)
            if max_bytes is not None and sizes[split] >= max_bytes:
                if all(sizes[s] >= max_bytes for s in SPLITS):
                    break
                continue
            data = (root / rel).read_bytes()
            chunks[split].append(data)
            files[split].append(rel)
            sizes[split] += len(data) + len(FILE_SEPARATOR)
        arrays = [_join(chunks[s], max_bytes) for s in SPLITS]
        return cls(*arrays, files=files)

    @classmethod
    def from_bytes(cls, train: bytes, val: bytes) -> TextCorpus:
        """A corpus over the given bytes, for tests and small experiments."""
        return cls(np.frombuffer(train, np.uint8).copy(), np.frombuffer(val, np.uint8).copy(),
                   files={s: [] for s in SPLITS})

    def batch(self, split: str, step: int, batch_size: int, seq_len: int,
              seed: int = 0) -> dict[str, np.ndarray]:
        """Random windows ``{"tokens": int32 [batch_size, seq_len + 1]}`` for one step.

        The windows depend only on ``(seed, split, step)``.
        """
        if split not in self.splits:
            raise ConfigError(f"split={split!r} is not one of {SPLITS}")
        data = self.splits[split]
        window = seq_len + 1
        if len(data) < window:
            raise ConfigError(f"the {split} split holds {len(data)} bytes, fewer than "
                              f"seq_len + 1 = {window}; lower seq_len or add text")
        rng = np.random.default_rng((seed, step, SPLITS.index(split)))
        starts = rng.integers(0, len(data) - window + 1, size=batch_size)
        tokens = data[starts[:, None] + np.arange(window)]
        return {"tokens": tokens.astype(np.int32)}


def stdlib_files(root: Path) -> list[str]:
    """Sorted POSIX paths, relative to ``root``, of the stdlib's ``.py`` files."""
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*.py")
        if not _EXCLUDED_DIRS.intersection(path.relative_to(root).parts) and path.is_file()
    )


def split_of(rel_path: str, val_fraction: float, seed: int = 0) -> str:
    """``"val"`` or ``"train"`` for a file, from a CRC32 of its relative path."""
    bucket = zlib.crc32(f"{seed}:{rel_path}".encode()) % 10_000
    return "val" if bucket < val_fraction * 10_000 else "train"


def _join(chunks: list[bytes], max_bytes: int | None) -> np.ndarray:
    data = FILE_SEPARATOR.join(chunks)[:max_bytes]
    return np.frombuffer(data, np.uint8).copy()
