"""Byte-level batches from the stdlib: stable file splits and resumable batches."""
import numpy as np
import pytest

from zjax.data.corpus import TextCorpus, split_of
from zjax.errors import ConfigError


@pytest.fixture(scope="module")
def corpus():
    return TextCorpus.stdlib(max_bytes=1_000_000)


def test_batches_are_a_function_of_seed_split_and_step(corpus):
    first = corpus.batch("train", step=7, batch_size=4, seq_len=32)["tokens"]
    again = corpus.batch("train", step=7, batch_size=4, seq_len=32)["tokens"]
    np.testing.assert_array_equal(first, again)
    for other in (corpus.batch("train", step=8, batch_size=4, seq_len=32),
                  corpus.batch("val", step=7, batch_size=4, seq_len=32),
                  corpus.batch("train", step=7, batch_size=4, seq_len=32, seed=1)):
        assert not np.array_equal(first, other["tokens"])


def test_batch_shape_dtype_and_byte_range(corpus):
    tokens = corpus.batch("val", step=0, batch_size=5, seq_len=64)["tokens"]
    assert tokens.shape == (5, 65) and tokens.dtype == np.int32
    assert tokens.min() >= 0 and tokens.max() < 256


def test_windows_are_contiguous_text():
    text = bytes(range(200))
    corpus = TextCorpus.from_bytes(text, text)
    tokens = corpus.batch("train", step=3, batch_size=8, seq_len=16)["tokens"]
    np.testing.assert_array_equal(np.diff(tokens, axis=1), 1)


def test_splits_are_disjoint_by_file_and_stable(corpus):
    train, val = set(corpus.files["train"]), set(corpus.files["val"])
    assert train and val and not train & val
    assert all(split_of(path, 0.1) == "train" for path in train)
    assert all(split_of(path, 0.1) == "val" for path in val)
    # crc32 of the path, not Python's salted hash: the same on every machine.
    assert split_of("typing.py", 0.1) == "val"
    assert split_of("os.py", 0.1) == "train"


def test_max_bytes_caps_each_split(corpus):
    assert len(corpus.splits["train"]) == 1_000_000
    assert 0 < len(corpus.splits["val"]) <= 1_000_000
    assert corpus.splits["train"].dtype == np.uint8
    assert not any("site-packages" in path for path in corpus.files["train"])


def test_short_split_names_the_problem():
    corpus = TextCorpus.from_bytes(b"abc", b"abcdefgh")
    with pytest.raises(ConfigError, match="seq_len"):
        corpus.batch("train", step=0, batch_size=1, seq_len=8)
    with pytest.raises(ConfigError, match="split='test'"):
        corpus.batch("test", step=0, batch_size=1, seq_len=2)
