"""The grain pipeline: per-process rows of global batches, resumable on any process count."""
import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import zjax.data.loader
from gpt_helpers import xla_flags
from zjax.config.schema import load_config
from zjax.data.corpus import TextCorpus
from zjax.distributed import free_local_port
from zjax.errors import ConfigError
from zjax.data.loader import (
    TokenWindows,
    corpus_windows,
    make_global_batch,
    make_loader,
    text_dir_windows,
    token_datasets,
    token_file_windows,
)

ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN = 7
WINDOW = SEQ_LEN + 1


class CountingWindows(TokenWindows):
    """Windows whose first token is the window index; remembers which ones were read."""

    def __init__(self, n_windows: int):
        super().__init__(np.arange(n_windows * WINDOW), SEQ_LEN)
        self.read: list[int] = []

    def __getitem__(self, index):
        self.read.append(int(index) % len(self))
        return super().__getitem__(index)


def ids(rows) -> list[int]:
    """Which window each row is (its first token // WINDOW)."""
    return (rows["tokens"][:, 0] // WINDOW).tolist()


def loaders(dataset, batch_size, count, **kwargs):
    return [make_loader(dataset, batch_size, process_index=p, process_count=count, **kwargs) for p in range(count)]


def test_docstring_examples_run():
    assert doctest.testmod(zjax.data.loader).failed == 0


def test_process_parts_are_disjoint_and_concatenate_to_the_global_batch():
    dataset = CountingWindows(37)
    whole = make_loader(dataset, 8, seed=3, process_index=0, process_count=1, prefetch=0)
    expected = [next(whole) for _ in range(6)]
    for count, prefetch in ((1, 2), (2, 0), (4, 3)):
        parts = loaders(dataset, 8, count, seed=3, prefetch=prefetch)
        seen = []
        for k in range(6):
            rows = [next(loader) for loader in parts]
            assert all(r["tokens"].shape == (8 // count, WINDOW) for r in rows)
            seen += sum((ids(r) for r in rows), [])
            for key in ("tokens", "segment_ids"):
                np.testing.assert_array_equal(np.concatenate([r[key] for r in rows]), expected[k][key])
        # the first 32 rows lie in epoch 0 of 37 records: no record twice, in any process
        assert len(set(seen[:32])) == 32


def test_each_process_reads_only_its_own_records():
    dataset = CountingWindows(37)
    parts = loaders(dataset, 8, 4, seed=1)
    for loader in parts:
        for k in range(3):
            dataset.read.clear()
            rows = loader.local_batch(k)
            assert sorted(dataset.read) == sorted(ids(rows))
            assert len(dataset.read) == 2


@pytest.mark.parametrize("before, after", [(2, 4), (2, 1)])
def test_resume_continues_at_batch_n_with_another_process_count(before, after):
    dataset = CountingWindows(29)
    whole = make_loader(dataset, 8, seed=5, process_index=0, process_count=1)
    expected = [ids(next(whole)) for _ in range(7)]
    first = loaders(dataset, 8, before, seed=5)
    for _ in range(4):
        for loader in first:
            next(loader)
    saved = json.loads(json.dumps(first[0].state()))
    assert saved["next_batch"] == 4 and all(loader.state() == first[0].state() for loader in first)
    resumed = loaders(dataset, 8, after, seed=5, state=saved)
    for k in (4, 5, 6):
        assert sum((ids(next(loader)) for loader in resumed), []) == expected[k]
    # restore() on a running loader rewinds it too
    resumed[0].restore(saved)
    assert ids(next(resumed[0])) == expected[4][: 8 // after]


def test_order_depends_on_the_seed_only():
    dataset = CountingWindows(50)
    first = [ids(next(make_loader(dataset, 16, seed=s, process_index=0, process_count=1))) for s in (0, 0, 1)]
    assert first[0] == first[1]
    assert first[0] != first[2]


def test_every_epoch_covers_each_record_once_in_a_new_order():
    n = 10
    parts = loaders(CountingWindows(n), 4, 2, seed=0)
    stream = sum((sum((ids(next(loader)) for loader in parts), []) for _ in range(5)), [])
    epochs = [stream[:n], stream[n:2 * n]]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(n))
    assert epochs[0] != epochs[1]
    ordered = make_loader(CountingWindows(n), 4, shuffle=False, process_index=0, process_count=1)
    assert sum((ids(next(ordered)) for _ in range(3)), []) == list(range(n)) + [0, 1]


def test_text_dir_packs_files_with_segment_ids_per_document(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"ab")
    (tmp_path / "b.txt").write_bytes(b"c")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_bytes(b"defghijk")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / ".hidden").write_bytes(b"never read")
    splits = text_dir_windows(tmp_path, seq_len=3, val_fraction=0.25)  # "abcdefghijk": 2 windows of 4 and 3 left
    assert (len(splits["train"]), len(splits["val"])) == (1, 1)
    train, val = splits["train"][0], splits["val"][0]
    assert bytes(train["tokens"].astype(np.uint8)) == b"abcd"
    np.testing.assert_array_equal(train["segment_ids"], [1, 1, 2, 3])
    assert bytes(val["tokens"].astype(np.uint8)) == b"efgh"
    np.testing.assert_array_equal(val["segment_ids"], [1, 1, 1, 1])
    assert train["tokens"].dtype == train["segment_ids"].dtype == np.int32


def test_token_file_ends_documents_at_eos(tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, np.array([5, 6, 0, 7, 0, 8, 9, 10, 11, 0, 12, 13, 0, 14, 15, 3], np.uint16))
    splits = token_file_windows(path, seq_len=4, val_fraction=0.0, eos_id=0, vocab_size=16)
    windows = [splits["train"][i] for i in range(len(splits["train"]))]
    assert [w["tokens"].tolist() for w in windows] == [[5, 6, 0, 7, 0], [8, 9, 10, 11, 0], [12, 13, 0, 14, 15]]
    assert [w["segment_ids"].tolist() for w in windows] == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 1], [1, 1, 1, 2, 2]]
    no_eos = token_file_windows(path, seq_len=4, val_fraction=0.0, vocab_size=16)["train"]
    assert all(no_eos[i]["segment_ids"].tolist() == [1] * 5 for i in range(3))


def test_config_builds_datasets_and_a_loader(tmp_path):
    for name in "abcd":
        (tmp_path / f"{name}.txt").write_bytes(name.encode() * 40)
    cfg = load_config("configs/base.yaml", {"data.dataset": "text_dir", "data.path": str(tmp_path),
                                            "data.seq_len": 9, "data.val_fraction": 0.25})
    splits = token_datasets(cfg.data, vocab_size=cfg.model.vocab_size)
    assert (len(splits["train"]), len(splits["val"])) == (12, 4)
    loader = make_loader(splits["train"], 4, seed=cfg.seed, prefetch=cfg.data.prefetch)
    assert next(loader)["tokens"].shape == (4, 10)


def test_corpus_windows_are_the_stream_cut_in_order():
    corpus = TextCorpus.from_bytes(bytes(range(256)) * 3, b"val text " * 4)
    windows = corpus_windows(corpus, "train", SEQ_LEN)
    assert len(windows) == 3 * 256 // WINDOW
    stream = np.concatenate([windows[i]["tokens"] for i in range(len(windows))])
    np.testing.assert_array_equal(stream, corpus.splits["train"][: len(stream)])
    assert all((windows[i]["segment_ids"] == 1).all() for i in range(len(windows)))


def test_global_array_equals_device_put_on_eight_devices():
    sharding = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
    loader = make_loader(CountingWindows(40), 16, seed=2, process_index=0, process_count=1)
    rows = next(loader)
    batch = loader.global_batch(rows, sharding)
    for key, array in batch.items():
        reference = jax.device_put(rows[key], sharding)
        assert array.shape == (16, WINDOW) and array.sharding == sharding
        np.testing.assert_array_equal(np.asarray(array), rows[key])
        for mine, theirs in zip(array.addressable_shards, reference.addressable_shards):
            assert mine.device == theirs.device and mine.index == theirs.index
            np.testing.assert_array_equal(np.asarray(mine.data), np.asarray(theirs.data))
    # posing as process 0 of 2: the sharding puts all 16 rows here, not rows [0, 8)
    with pytest.raises(ConfigError, match=r"rows \[0, 16\).*rows \[0, 8\)"):
        make_global_batch(jax.tree.map(lambda x: x[:8], rows), sharding, 16, process_index=0, process_count=2)


def test_bad_inputs_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.path=.*does not exist"):
        text_dir_windows(tmp_path / "missing", 4)
    with pytest.raises(ConfigError, match="data.path=.*holds no files"):
        text_dir_windows(tmp_path, 4)
    (tmp_path / "short.txt").write_bytes(b"abc")
    with pytest.raises(ConfigError, match=r"holds 3 tokens, fewer than data.seq_len \+ 1 = 5"):
        text_dir_windows(tmp_path, 4)
    with pytest.raises(ConfigError, match="data.path=.*does not exist"):
        token_file_windows(tmp_path / "missing.npy", 4)
    np.save(tmp_path / "t.npy", np.array([1, 2, 300, 4, 5, 6]))
    with pytest.raises(ConfigError, match="token id 300.*model.vocab_size=256"):
        token_file_windows(tmp_path / "t.npy", 4)
    with pytest.raises(ConfigError, match="data.eos_id=256"):
        token_file_windows(tmp_path / "t.npy", 4, eos_id=256)
    np.save(tmp_path / "t2.npy", np.ones((2, 8), np.int32))
    with pytest.raises(ConfigError, match=r"shape \(2, 8\).*1-D"):
        token_file_windows(tmp_path / "t2.npy", 4)
    with pytest.raises(ConfigError, match="data.val_fraction=0.5 leaves none for training"):
        token_file_windows(tmp_path / "t.npy", 4, val_fraction=0.5, vocab_size=512)
    with pytest.raises(ConfigError, match="batch.global_batch_size=6 .* process_count=4"):
        make_loader(CountingWindows(10), 6, process_index=0, process_count=4)
    with pytest.raises(ConfigError, match="has no records"):
        make_loader(token_file_windows(tmp_path / "t.npy", 4, val_fraction=0.0, vocab_size=512)["val"], 1)
    with pytest.raises(ConfigError, match="-1 must be >= 0"):
        make_loader(CountingWindows(10), 2, seed=-1)
    for overrides, message in (({"data.dataset": "wiki"}, "data.dataset='wiki'.*'stdlib', 'text_dir' or 'tokens'"),
                               ({"data.dataset": "tokens"}, "reads data.path, which is null"),
                               ({"data.eos_id": 0}, "eos_id=0 only applies to dataset='tokens'")):
        with pytest.raises(ConfigError, match=message):
            load_config("configs/base.yaml", overrides)


def test_restore_refuses_state_of_other_data_seed_or_batch_size():
    loader = make_loader(CountingWindows(20), 4, seed=1, process_index=0, process_count=1)
    state = loader.state()
    for key, value, builder in (
        ("seed", 2, lambda s: make_loader(CountingWindows(20), 4, seed=2, process_count=1, process_index=0, state=s)),
        ("global_batch_size", 8, lambda s: make_loader(CountingWindows(20), 8, seed=1, process_count=1,
                                                      process_index=0, state=s)),
        ("dataset", "windows=21", lambda s: make_loader(CountingWindows(21), 4, seed=1, process_count=1,
                                                       process_index=0, state=s)),
    ):
        with pytest.raises(ConfigError, match=f"{key}=.*{value}"):
            builder(state)
    with pytest.raises(ConfigError, match="lacks"):
        loader.restore({"next_batch": 3})


WORKER = """
import json, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
                           initialization_timeout=60)
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from zjax.data.loader import TokenWindows, make_loader
loader = make_loader(TokenWindows(np.arange(40 * 8), seq_len=7), 8, seed=4)
sharding = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
rows = []
for _ in range(3):
    batch = loader.global_batch(next(loader), sharding)
    rows.append((multihost_utils.process_allgather(batch["tokens"], tiled=True)[:, 0] // 8).tolist())
print("RESULT", json.dumps({"local": loader.local_batch_size, "rows": rows, "state": loader.state()}))
"""


def test_two_real_processes_assemble_the_one_process_batches():
    env = {**os.environ, "XLA_FLAGS": xla_flags(4), "JAX_PLATFORMS": "cpu"}
    address = f"127.0.0.1:{free_local_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, address, str(i)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.split("RESULT")[1]) for out, _ in outputs]
    whole = make_loader(TokenWindows(np.arange(40 * 8), seq_len=7), 8, seed=4, process_index=0, process_count=1)
    expected = [ids(next(whole)) for _ in range(3)]
    for result in results:
        assert result["local"] == 4 and result["rows"] == expected
        assert result["state"] == whole.state()
