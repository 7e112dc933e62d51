"""zjax.inference.tokenizer: bytes and a tokenizer.json round-trip text, incremental decoding never
splits a UTF-8 character and joins to the whole decode, EOS ids and chat templates are read from the
files beside tokenizer.json."""
import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from zjax.errors import ConfigError
from zjax.inference.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

TEXT = "héllo wörld — 1 € a 😀 and 日本語 too"
CORPUS = ["hello world", "héllo wörld", "the euro € sign", "emoji 😀 😀", "日本語 text", "one two three"] * 20
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained here on a small corpus, with the files transformers writes beside it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    directory = tmp_path_factory.mktemp("hf")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": CHAT_TEMPLATE}))
    end = tok.token_to_id("<|end|>")
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id("</s>"), end]}))
    return directory


def pieces(tokenizer, ids):
    detokenizer = tokenizer.detokenizer()
    return [detokenizer.add([token]) for token in ids] + [detokenizer.flush()]


def test_bytes_round_trip_and_invalid_bytes_decode_as_replacement():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode()) and max(ids) > 127
    assert tok.decode(ids) == TEXT
    assert tok.decode([104, 0xE2, 0x82, 105, 300]) == "h\ufffdi"  # a cut character; 300 is no byte
    assert [tok.token_text(t) for t in (104, 0xE2)] == ["h", "bytes:\\xe2"]


@pytest.mark.parametrize("make", [ByteTokenizer, lambda: None], ids=["bytes", "hf"])
def test_incremental_decoding_holds_back_split_characters(make, hf_dir):
    tok = make() or HFTokenizer(hf_dir)
    ids = tok.encode(TEXT, add_special_tokens=False)
    out = pieces(tok, ids)
    assert "".join(out) == TEXT == tok.decode(ids)
    assert not any("\ufffd" in piece for piece in out)
    if isinstance(tok, ByteTokenizer):
        euro = TEXT.index("€")
        start = len(TEXT[:euro].encode())
        assert out[start:start + 3] == ["", "", "€"]  # three bytes, one character once complete
    else:  # the BPE splits some multi-byte characters over tokens: a piece waited for the rest
        assert "" in out[:-1]


def test_incremental_decoding_of_bytes_that_never_complete_a_character():
    tok = ByteTokenizer()
    ids = [0xF0, 0x9F, 104, 0xE2]  # half an emoji, 'h', a lone lead byte
    out = pieces(tok, ids)
    assert "".join(out) == tok.decode(ids) == "\ufffdh\ufffd"
    assert out[-1] == "\ufffd"  # the incomplete tail is only given up at flush


def test_hf_tokenizer_round_trips_and_reads_eos_and_special_tokens(hf_dir):
    tok = load_tokenizer(hf_dir, vocab_size=512)
    assert isinstance(tok, HFTokenizer)
    raw = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert tok.vocab_size == raw.get_vocab_size() == 300
    ids = tok.encode(TEXT)
    assert ids == raw.encode(TEXT).ids and len(ids) < len(TEXT.encode())  # merges happened
    assert tok.decode(ids) == TEXT
    eos, end = raw.token_to_id("</s>"), raw.token_to_id("<|end|>")
    assert tok.eos_token_id == eos and tok.eos_token_ids == (eos, end)
    assert tok.decode(ids + [eos]) == TEXT  # special tokens are left out of the text


def test_chat_template_renders_with_jinja_and_bytes_use_the_default(hf_dir):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    tok = HFTokenizer(hf_dir)
    assert tok.renders_template
    assert tok.apply_chat_template(messages) == "<s>[system] be brief</s>[user] hi</s>[assistant] "
    raw = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert tok.encode_chat(messages) == raw.encode(tok.apply_chat_template(messages), add_special_tokens=False).ids
    assert ByteTokenizer().apply_chat_template(messages) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"


def test_load_tokenizer_picks_bytes_or_says_what_is_missing(tmp_path, hf_dir):
    assert isinstance(load_tokenizer(None, 256), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path, 512), ByteTokenizer)  # no tokenizer.json there
    with pytest.raises(ConfigError, match=r"vocab_size=64.*has no tokenizer.json.*256"):
        load_tokenizer(tmp_path, 64)
    with pytest.raises(ConfigError, match=r"300 tokens but the model's vocab_size is 256"):
        load_tokenizer(hf_dir, 256)
