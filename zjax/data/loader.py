"""Sharded, resumable token batches on grain: each process reads only its own rows.

A dataset is a random-access grain source of fixed windows, each record
``{"tokens": int32 [seq_len + 1], "segment_ids": int32 [seq_len + 1]}``. Documents are
concatenated and cut into non-overlapping windows; ``segment_ids`` number the documents
inside a window from 1, so attention and ``gpt_loss`` never cross a document boundary.

The loader defines one infinite stream of records: epoch ``e`` is a permutation of all
windows seeded by ``(seed, e)``, and global batch ``k`` is stream positions
``[k*B, (k+1)*B)``. Process ``p`` of ``P`` reads rows ``[p*B/P, (p+1)*B/P)`` of every
global batch and no other record. Global batch ``k`` is therefore the same for every
``P``, and the loader's state is just ``k``: a run saved with 2 processes resumes with 4.

Example:
  >>> import numpy as np
  >>> windows = TokenWindows(np.arange(40) % 7, seq_len=3)  # 10 windows of 4 tokens
  >>> halves = [make_loader(windows, 4, seed=0, process_index=p, process_count=2) for p in (0, 1)]
  >>> rows = np.concatenate([next(loader)["tokens"] for loader in halves])
  >>> whole = make_loader(windows, 4, seed=0, process_count=1, process_index=0)
  >>> bool((rows == next(whole)["tokens"]).all()), halves[0].state()["next_batch"]
  (True, 1)
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

from zjax.config.schema import DataConfig
from zjax.data.corpus import SPLITS, VOCAB_SIZE, TextCorpus
from zjax.errors import ConfigError

STATE_KEYS = ("next_batch", "seed", "shuffle", "global_batch_size", "dataset")
# Token files are scanned in chunks so validating a large memory-mapped file stays in bounded memory.
_SCAN_CHUNK = 1 << 24


def token_datasets(data: DataConfig, *, vocab_size: int = VOCAB_SIZE, seed: int = 0,
                   max_bytes: int | None = None) -> dict[str, TokenWindows]:
    """The train and val windows of the ``data`` block's dataset.

    Args:
      data: the config's ``data`` block (``dataset``, ``path``, ``eos_id``, ``seq_len``,
        ``val_fraction``).
      vocab_size: the model's vocabulary (``model.vocab_size``); every token must lie below it.
      seed: salts the stdlib's file split (the top-level ``seed``).
      max_bytes: stdlib only: cap on each split's bytes, as ``TextCorpus.stdlib``.

    Returns:
      ``{"train": TokenWindows, "val": TokenWindows}``.
    """
    if data.dataset == "stdlib":
        _check_byte_vocab(vocab_size)
        corpus = TextCorpus.stdlib(data.val_fraction, max_bytes=max_bytes, seed=seed)
        return {split: corpus_windows(corpus, split, data.seq_len) for split in SPLITS}
    if data.dataset == "text_dir":
        _check_byte_vocab(vocab_size)
        return text_dir_windows(data.path, data.seq_len, val_fraction=data.val_fraction)
    return token_file_windows(data.path, data.seq_len, val_fraction=data.val_fraction,
                              eos_id=data.eos_id, vocab_size=vocab_size)


class TokenWindows:
    """Non-overlapping windows of ``seq_len + 1`` tokens: a random-access grain source.

    Args:
      tokens: the 1-D token stream (any integer dtype; a memory map stays on disk).
      seq_len: model sequence length; each window holds ``seq_len + 1`` tokens.
      doc_starts: sorted offsets in ``tokens`` where documents begin; ``None`` is one document.
      windows: which window indices of the stream this source serves (a split); default all.
      name: what the windows are, for ``fingerprint`` and error messages.

    Example:
      >>> w = TokenWindows(np.arange(10), seq_len=3, doc_starts=np.array([0, 6]))
      >>> len(w), w[1]["tokens"].tolist(), w[1]["segment_ids"].tolist()
      (2, [4, 5, 6, 7], [1, 1, 2, 2])
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, *, doc_starts: np.ndarray | None = None,
                 windows: range | None = None, name: str = "tokens"):
        self.tokens = tokens
        self.seq_len = seq_len
        self.window = seq_len + 1
        self.doc_starts = np.zeros(1, np.int64) if doc_starts is None else np.asarray(doc_starts, np.int64)
        self.windows = range(len(tokens) // self.window) if windows is None else windows
        self.name = name

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start = self.windows[index] * self.window
        tokens = np.asarray(self.tokens[start:start + self.window], dtype=np.int32)
        docs = np.searchsorted(self.doc_starts, np.arange(start, start + self.window), side="right")
        return {"tokens": tokens, "segment_ids": (docs - docs[0] + 1).astype(np.int32)}

    @property
    def fingerprint(self) -> str:
        """Identifies the content cheaply (size and a CRC of three windows), not the path."""
        sample = sorted({0, len(self) // 2, len(self) - 1}) if len(self) else []
        crc = zlib.crc32(b"".join(self[i]["tokens"].tobytes() + self[i]["segment_ids"].tobytes()
                                  for i in sample))
        return f"{self.name}:seq_len={self.seq_len}:windows={len(self)}:crc32={crc:08x}"


def corpus_windows(corpus: TextCorpus, split: str, seq_len: int) -> TokenWindows:
    """The byte windows of one ``TextCorpus`` split.

    The corpus joins files with ``FILE_SEPARATOR``, which also occurs inside files, so
    file boundaries are not recoverable: every window is one segment (all ids 1), as in
    the demo's random windows.

    Args:
      corpus: e.g. ``TextCorpus.stdlib(...)``.
      split: ``"train"`` or ``"val"``.
      seq_len: tokens per sequence (windows hold ``seq_len + 1``).

    Returns:
      ``TokenWindows`` named ``stdlib/<split>``.
    """
    if split not in corpus.splits:
        raise ConfigError(f"split={split!r} is not one of {SPLITS}")
    data = corpus.splits[split]
    _check_one_window(len(data), seq_len, f"the {split} split of the text corpus")
    return TokenWindows(data, seq_len, name=f"stdlib/{split}")


def text_dir_windows(path: str | Path, seq_len: int, *, val_fraction: float = 0.1) -> dict[str, TokenWindows]:
    """Byte-level windows packed from every file under a directory, one document per file.

    Files (hidden ones skipped) are read in sorted order of their relative paths and
    concatenated without separators; ``segment_ids`` mark where each file starts. The
    last ``ceil(val_fraction x windows)`` windows form the val split.

    Args:
      path: the directory (``data.path``); searched recursively.
      seq_len: tokens per sequence (``data.seq_len``).
      val_fraction: share of windows held out (``data.val_fraction``).

    Returns:
      ``{"train": TokenWindows, "val": TokenWindows}``.
    """
    root = Path(path)
    if not root.is_dir():
        state = "is a file, not a directory" if root.exists() else "does not exist"
        raise ConfigError(f"data.path={str(path)!r} {state}; data.dataset=text_dir needs a directory of text "
                          "files (a .npy token file goes with data.dataset=tokens)")
    relative = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    # hidden files and folders (.git, .DS_Store) are not text to train on
    files = [root / rel for rel in relative if not any(part.startswith(".") for part in rel.split("/"))]
    documents = [data for data in (p.read_bytes() for p in files) if data]
    if not documents:
        found = f"only {len(files)} empty files" if files else "no files"
        raise ConfigError(f"data.path={str(path)!r} holds {found}; put the text files to train on there")
    doc_starts = np.cumsum([0] + [len(d) for d in documents[:-1]])
    tokens = np.frombuffer(b"".join(documents), np.uint8)
    return _split_windows(tokens, doc_starts, seq_len, val_fraction, "text_dir", f"data.path={str(path)!r}")


def token_file_windows(path: str | Path, seq_len: int, *, val_fraction: float = 0.1, eos_id: int | None = None,
                       vocab_size: int = VOCAB_SIZE) -> dict[str, TokenWindows]:
    """Windows packed from a 1-D ``.npy`` array of token ids, memory-mapped.

    A document ends with (and includes) each ``eos_id`` token, so the model learns to
    predict it and the next document starts a new segment. The last
    ``ceil(val_fraction x windows)`` windows form the val split.

    Args:
      path: the ``.npy`` file (``data.path``).
      seq_len: tokens per sequence (``data.seq_len``).
      val_fraction: share of windows held out (``data.val_fraction``).
      eos_id: the end-of-document id (``data.eos_id``); ``None``: the file is one document.
      vocab_size: every id must lie in ``[0, vocab_size)`` (``model.vocab_size``).

    Returns:
      ``{"train": TokenWindows, "val": TokenWindows}``.
    """
    where = f"data.path={str(path)!r}"
    if not Path(path).is_file():
        raise ConfigError(f"{where} does not exist or is not a file; data.dataset=tokens needs a .npy file "
                          "holding a 1-D array of token ids")
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise ConfigError(f"data.eos_id={eos_id} is not a token id below model.vocab_size={vocab_size}; "
                          "use the tokenizer's end-of-document id, or null for no boundaries")
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ConfigError(f"{where} is not a readable .npy array ({err}); save tokens with np.save") from None
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        got = f"shape {tokens.shape}, dtype {tokens.dtype}" if isinstance(tokens, np.ndarray) else type(tokens).__name__
        raise ConfigError(f"{where} holds {got}; data.dataset=tokens needs a 1-D integer array of token ids")
    _check_one_window(len(tokens), seq_len, where)
    lowest, highest, eos_positions = _scan_tokens(tokens, eos_id)
    if lowest < 0 or highest >= vocab_size:
        bad = lowest if lowest < 0 else highest
        raise ConfigError(f"{where} holds token id {bad}, outside [0, model.vocab_size={vocab_size}); "
                          f"set model.vocab_size to at least {highest + 1} or re-tokenize the data")
    doc_starts = np.concatenate([[0], eos_positions[eos_positions < len(tokens) - 1] + 1])
    return _split_windows(tokens, doc_starts, seq_len, val_fraction, "tokens", where)


def make_loader(dataset: Sequence[dict[str, np.ndarray]], global_batch_size: int, *, seed: int = 0,
                shuffle: bool = True, prefetch: int = 2, process_index: int | None = None,
                process_count: int | None = None, state: Mapping[str, Any] | None = None) -> ShardedLoader:
    """This process's rows of every global batch, in a seeded order that repeats forever.

    Args:
      dataset: a random-access source (``__len__`` and ``__getitem__``), e.g. ``TokenWindows``.
      global_batch_size: rows per global batch over all processes (``batch.global_batch_size``).
      seed: orders the records (the top-level ``seed``); each epoch is reshuffled.
      shuffle: ``False`` keeps the dataset order (evaluation), still repeating.
      prefetch: batches read ahead in background grain threads (``data.prefetch``); 0: none.
      process_index: this process (default ``jax.process_index()``).
      process_count: processes sharing each batch (default ``jax.process_count()``).
      state: a ``ShardedLoader.state()`` to resume from.

    Returns:
      A ``ShardedLoader``; ``next(loader)`` gives ``{key: [global_batch_size / process_count, ...]}``.
    """
    return ShardedLoader(dataset, global_batch_size, seed=seed, shuffle=shuffle, prefetch=prefetch,
                         process_index=process_index, process_count=process_count, state=state)


class ShardedLoader:
    """Iterator over this process's rows of global batches; see ``make_loader``."""

    def __init__(self, dataset: Sequence[dict[str, np.ndarray]], global_batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, prefetch: int = 2, process_index: int | None = None,
                 process_count: int | None = None, state: Mapping[str, Any] | None = None):
        process_count = jax.process_count() if process_count is None else process_count
        process_index = jax.process_index() if process_index is None else process_index
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ConfigError(f"process_index={process_index}, process_count={process_count}: need "
                              "process_count >= 1 and 0 <= process_index < process_count")
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ConfigError(f"batch.global_batch_size={global_batch_size} is not a positive multiple of "
                              f"process_count={process_count}; each process reads an equal share of the rows, "
                              f"so use a multiple of {process_count}")
        if seed < 0:
            raise ConfigError(f"seed={seed} must be >= 0; it seeds the order of the records")
        if prefetch < 0:
            raise ConfigError(f"data.prefetch={prefetch} must be >= 0 (0 reads in the calling thread)")
        if len(dataset) == 0:
            raise ConfigError(f"dataset {_fingerprint(dataset)} has no records; with an empty val split, "
                              "set data.val_fraction above 0")
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        self.seed, self.shuffle, self.prefetch = seed, shuffle, prefetch
        self.fingerprint = _fingerprint(dataset)
        records = grain.MapDataset.source(dataset)
        if shuffle:
            # Grain seeds epoch e with seed + e; hashing the seed first keeps seed s's
            # second epoch from being seed s + 1's first.
            records = records.shuffle(seed=int(np.random.SeedSequence(seed).generate_state(1)[0]))
        # Chunk i of the repeated stream is rows [i*b, (i+1)*b); global batch k is
        # chunks k*P .. k*P + P - 1, and this process owns chunk k*P + p.
        self._chunks = records.repeat().batch(self.local_batch_size, drop_remainder=True)
        self.next_batch = 0
        self._iterator = None
        if state is not None:
            self.restore(state)

    def __iter__(self) -> ShardedLoader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            start = self.next_batch * self.process_count + self.process_index
            mine = self._chunks[start::self.process_count]
            options = grain.ReadOptions(num_threads=self.prefetch, prefetch_buffer_size=self.prefetch)
            self._iterator = iter(mine.to_iter_dataset(options))
        rows = next(self._iterator)
        self.next_batch += 1
        return rows

    def local_batch(self, k: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch ``k``, read now; the iterator is unaffected."""
        return self._chunks[k * self.process_count + self.process_index]

    def state(self) -> dict[str, Any]:
        """A JSON-able dict: resuming from it yields global batch ``next_batch`` next, for any process count."""
        return {"next_batch": self.next_batch, "seed": self.seed, "shuffle": self.shuffle,
                "global_batch_size": self.global_batch_size, "dataset": self.fingerprint}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a ``state()``, refusing one taken over other data, seed or batch size.

        Args:
          state: a dict from ``state()`` (this or another process count).
        """
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise ConfigError(f"data loader state {dict(state)!r} lacks {missing}; pass a dict from loader.state()")
        ours = self.state()
        for key, hint in (("dataset", "the data changed (path, seq_len, val_fraction or the files themselves)"),
                          ("seed", "resume with the seed the run started with"),
                          ("global_batch_size", "resume with the batch.global_batch_size the run started with"),
                          ("shuffle", "the saved loader was built with another shuffle setting")):
            if state[key] != ours[key]:
                raise ConfigError(f"data loader state has {key}={state[key]!r} but this loader has "
                                  f"{key}={ours[key]!r}; {hint}, or start a fresh run")
        next_batch = state["next_batch"]
        if not isinstance(next_batch, int) or next_batch < 0:
            raise ConfigError(f"data loader state next_batch={next_batch!r} must be an integer >= 0")
        self.close()
        self.next_batch = next_batch

    def global_batch(self, local_rows: Any, sharding: Any) -> Any:
        """``make_global_batch`` for this loader's rows (see there)."""
        return make_global_batch(local_rows, sharding, self.global_batch_size,
                                 process_index=self.process_index, process_count=self.process_count)

    def close(self) -> None:
        """Stops the background reading threads; ``next`` starts them again."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None


def shift_tokens(rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Token windows ``{"tokens": [B, T+1]}`` (optional ``segment_ids``, ``loss_mask``)
    as inputs and targets of length T, so that a sequence split over devices splits them
    alike (DeepSpeed ALST's pre-shifted labels): ``inputs``, ``targets``, ``segment_ids``
    (the inputs'), ``loss_mask`` (1 where the target counts: its own mask, and the same
    document as its input). Positions are each token's index in the row.

    Example:
      >>> b = shift_tokens({"tokens": np.array([[5, 6, 7, 8]]), "segment_ids": np.array([[1, 1, 2, 2]])})
      >>> b["inputs"].tolist(), b["targets"].tolist(), b["loss_mask"].tolist()
      ([[5, 6, 7]], [[6, 7, 8]], [[1, 0, 1]])
    """
    tokens = np.asarray(rows["tokens"])
    counted = np.ones(tokens[:, 1:].shape, np.int32)
    out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    if "loss_mask" in rows:
        counted &= np.asarray(rows["loss_mask"])[:, 1:] != 0
    if "segment_ids" in rows:
        ids = np.asarray(rows["segment_ids"])
        counted &= ids[:, 1:] == ids[:, :-1]
        out["segment_ids"] = ids[:, :-1]
    out["loss_mask"] = counted.astype(np.int32)
    return out


def make_global_batch(local_rows: Any, sharding: Any, global_batch_size: int, *,
                      process_index: int | None = None, process_count: int | None = None) -> Any:
    """One global ``jax.Array`` per leaf from each process's rows of the batch.

    Process ``p`` passes rows ``[p*B/P, (p+1)*B/P)``; the sharding must put exactly those
    rows on its devices (a mesh whose ``data`` axis runs through the processes in order,
    as ``jax.make_mesh`` builds it), else this raises rather than misplace rows.

    Args:
      local_rows: a pytree of arrays with ``global_batch_size / process_count`` rows.
      sharding: e.g. ``NamedSharding(mesh, P("data"))`` (``train.batch_sharding``), or a
        function of a leaf's global shape that gives its sharding
        (``train.batch_sharding_for``: rows split over ``sequence`` too).
      global_batch_size: rows of the global batch.
      process_index: default ``jax.process_index()``.
      process_count: default ``jax.process_count()``.

    Returns:
      The same pytree of global arrays ``[global_batch_size, ...]`` laid out by ``sharding``.
    """
    process_count = jax.process_count() if process_count is None else process_count
    process_index = jax.process_index() if process_index is None else process_index
    rows = global_batch_size // process_count
    expected = (process_index * rows, (process_index + 1) * rows)

    def assemble(x: np.ndarray) -> jax.Array:
        global_shape = (global_batch_size, *np.shape(x)[1:])
        placement = sharding(global_shape) if callable(sharding) else sharding
        if np.shape(x)[0] != rows:
            raise ConfigError(f"local rows have shape {np.shape(x)}, but process {process_index} of {process_count} "
                              f"owns {rows} of batch.global_batch_size={global_batch_size} rows")
        placed = sorted(set().union(*(range(*index[0].indices(global_batch_size)) for index in
                                      placement.addressable_devices_indices_map(global_shape).values())))
        if placed != list(range(*expected)):
            raise ConfigError(
                f"the sharding puts rows {_spans(placed)} of the global batch on process "
                f"{process_index}'s devices, but that process holds rows [{expected[0]}, {expected[1]}) "
                f"(process_count={process_count}); order the mesh's data axis by process, as jax.make_mesh does"
            )
        return jax.make_array_from_process_local_data(placement, np.asarray(x), global_shape)

    return jax.tree.map(assemble, local_rows)


def _split_windows(tokens: np.ndarray, doc_starts: np.ndarray, seq_len: int, val_fraction: float,
                   kind: str, where: str) -> dict[str, TokenWindows]:
    _check_one_window(len(tokens), seq_len, where)
    n = len(tokens) // (seq_len + 1)
    n_val = math.ceil(val_fraction * n)
    if n_val >= n:
        raise ConfigError(f"{where} gives only {n} windows of data.seq_len + 1 = {seq_len + 1} tokens and "
                          f"data.val_fraction={val_fraction} leaves none for training; lower data.val_fraction "
                          "or data.seq_len, or add data")
    bounds = {"train": range(0, n - n_val), "val": range(n - n_val, n)}
    return {split: TokenWindows(tokens, seq_len, doc_starts=doc_starts, windows=bounds[split], name=f"{kind}/{split}")
            for split in SPLITS}


def _check_one_window(n_tokens: int, seq_len: int, where: str) -> None:
    if n_tokens < seq_len + 1:
        raise ConfigError(f"{where} holds {n_tokens} tokens, fewer than data.seq_len + 1 = {seq_len + 1}; "
                          "lower data.seq_len or add data")


def _check_byte_vocab(vocab_size: int) -> None:
    if vocab_size < VOCAB_SIZE:
        raise ConfigError(f"model.vocab_size={vocab_size} cannot hold byte-level tokens; use at least {VOCAB_SIZE}")


def _scan_tokens(tokens: np.ndarray, eos_id: int | None) -> tuple[int, int, np.ndarray]:
    """Smallest and largest id and the positions of ``eos_id``, in bounded memory."""
    lowest, highest, eos = None, None, []
    for start in range(0, len(tokens), _SCAN_CHUNK):
        chunk = np.asarray(tokens[start:start + _SCAN_CHUNK])
        low, high = int(chunk.min()), int(chunk.max())
        lowest = low if lowest is None else min(lowest, low)
        highest = high if highest is None else max(highest, high)
        if eos_id is not None:
            eos.append(np.flatnonzero(chunk == eos_id) + start)
    return lowest, highest, np.concatenate(eos) if eos else np.zeros(0, np.int64)


def _spans(rows: list[int]) -> str:
    """``[0, 2) [4, 6)`` for rows 0, 1, 4, 5."""
    starts = [r for i, r in enumerate(rows) if i == 0 or rows[i - 1] != r - 1]
    ends = [r + 1 for i, r in enumerate(rows) if i == len(rows) - 1 or rows[i + 1] != r + 1]
    return " ".join(f"[{a}, {b})" for a, b in zip(starts, ends))


def _fingerprint(dataset: Sequence) -> str:
    return getattr(dataset, "fingerprint", None) or f"{type(dataset).__name__}:records={len(dataset)}"
