"""Text to token ids and back, for serving: the demo model's bytes or a Hugging Face ``tokenizer.json``.

A tokenizer has ``encode(text)``, ``decode(ids)``, ``vocab_size``, ``eos_token_id`` (None when
it has none) and ``eos_token_ids`` (every id that ends a generation), ``token_text(id)`` (one
token as text, for logprobs), ``detokenizer(prompt_ids)`` (incremental decoding for
streaming) and ``apply_chat_template(messages)``.

- ``ByteTokenizer``: UTF-8 bytes are ids 0..255 (the demo model's vocabulary); no EOS.
- ``HFTokenizer``: the ``tokenizers`` package's ``Tokenizer.from_file(dir/"tokenizer.json")``;
  its EOS ids from ``tokenizer_config.json``'s ``eos_token``, ``generation_config.json``'s and
  ``config.json``'s ``eos_token_id`` (all that are there).

Streaming: a token may end inside a UTF-8 character (a byte model, byte-fallback BPE), so
``detokenizer`` returns an object whose ``add(ids)`` gives only text that no later token can
change, holding back an incomplete character, and whose ``flush()`` gives the rest. The
pieces joined are the text the new ids add to the prompt's: ``decode`` of the new ids, up to
the space a word-piece tokenizer puts between the prompt's last word and the first new one.

Chat: ``apply_chat_template(messages)`` renders ``tokenizer_config.json``'s ``chat_template``
(or a ``chat_template.jinja`` file beside it) with ``jinja2`` in a sandbox, as transformers
does, when the directory has one and ``jinja2`` is installed (it is not one of zjax's runtime
dependencies; transformers and torch bring it). Otherwise it uses ``DEFAULT_CHAT_TEMPLATE``:
each message as ``<|role|>\\ncontent\\n``, then ``DEFAULT_GENERATION_PROMPT``, ``<|assistant|>\\n``.
"""
from __future__ import annotations

import codecs
import importlib.util
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from zjax.errors import ConfigError

__all__ = ["DEFAULT_CHAT_TEMPLATE", "DEFAULT_GENERATION_PROMPT", "TOKENIZER_FILE", "ByteTokenizer", "Detokenizer",
           "HFTokenizer", "Tokenizer", "load_tokenizer"]

TOKENIZER_FILE = "tokenizer.json"
# the chat format without a template: each message, then the start of the assistant's reply
DEFAULT_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
DEFAULT_GENERATION_PROMPT = "<|assistant|>\n"
BYTE_VOCAB = 256
# tokens decoded again before the new ones, so that a piece's leading space is decoded in context
_CONTEXT_TOKENS = 5


def load_tokenizer(path, vocab_size: int) -> Tokenizer:
    """The tokenizer for a model: a directory's ``tokenizer.json``, else bytes.

    Args:
      path: a directory (a Hugging Face checkpoint, a run's output directory) or None.
      vocab_size: the model's vocabulary size.

    Returns:
      ``HFTokenizer(path)`` when ``path/tokenizer.json`` exists, else ``ByteTokenizer()``
      when ``vocab_size >= 256``.

    Raises:
      ConfigError: when neither fits, or the tokenizer has more tokens than the model.

    Example:
      >>> load_tokenizer(None, 256).encode("hé")
      [104, 195, 169]
    """
    if path is not None and (Path(path) / TOKENIZER_FILE).is_file():
        tokenizer = HFTokenizer(path)
        if tokenizer.vocab_size > vocab_size:
            raise ConfigError(f"{Path(path) / TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but the model's "
                              f"vocab_size is {vocab_size}; the tokenizer and the model do not belong together")
        return tokenizer
    if vocab_size >= BYTE_VOCAB:
        return ByteTokenizer()
    where = "no directory was given" if path is None else f"{path} has no {TOKENIZER_FILE}"
    raise ConfigError(f"no tokenizer for a model of vocab_size={vocab_size}: {where}, and the byte tokenizer "
                      f"needs vocab_size >= {BYTE_VOCAB}; put the model's {TOKENIZER_FILE} in the directory")


class Tokenizer:
    """What the server needs of a tokenizer; ``ByteTokenizer`` and ``HFTokenizer`` implement it."""

    vocab_size: int
    eos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    chat_template: str | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens (EOS) left out."""
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        """One token as text: its string, or ``bytes:\\xNN...`` when it is not whole UTF-8
        characters (OpenAI's convention for logprobs)."""
        raise NotImplementedError

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> Detokenizer:
        """An incremental decoder of the tokens that follow ``prompt_ids``."""
        return Detokenizer(self, prompt_ids)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The prompt ids of a chat (``{"role", "content"}`` dicts), ending where the assistant's
        reply starts."""
        return self.encode(self.apply_chat_template(messages))

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt text of a chat, ending where the assistant's reply starts."""
        return "".join(DEFAULT_CHAT_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages) + (
            DEFAULT_GENERATION_PROMPT)


class Detokenizer:
    """Decodes tokens as they come; see the module docstring.

    It decodes a window of a few tokens already returned plus the new ones, and returns the
    text beyond the window's old text once it does not end in an incomplete character
    (U+FFFD), so each step costs a few tokens' decoding, whatever the length so far.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._ids = [int(t) for t in prompt_ids]
        self._read = len(self._ids)  # tokens whose text was returned (the prompt's counts as returned)
        self._prefix = max(self._read - _CONTEXT_TOKENS, 0)

    def add(self, ids: Sequence[int]) -> str:
        """The new text that ``ids`` complete; an incomplete character waits for the next call."""
        self._ids += [int(t) for t in ids]
        before = self._tokenizer.decode(self._ids[self._prefix:self._read])
        text = self._tokenizer.decode(self._ids[self._prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before):]

    def flush(self) -> str:
        """The text held back (an incomplete character decodes as U+FFFD)."""
        before = self._tokenizer.decode(self._ids[self._prefix:self._read])
        text = self._tokenizer.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(before):]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as token ids 0..255, the demo model's vocabulary.

    Ids of 256 and above (a padded vocabulary) decode to nothing; invalid UTF-8 decodes as
    U+FFFD, as ``bytes.decode(errors="replace")``.

    Example:
      >>> tok = ByteTokenizer()
      >>> ids = tok.encode("€1")
      >>> ids, tok.decode(ids)
      ([226, 130, 172, 49], '€1')
      >>> d = tok.detokenizer()
      >>> [d.add([i]) for i in ids] + [d.flush()]
      ['', '', '€', '1', '']
    """

    vocab_size = BYTE_VOCAB

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(t) for t in ids if 0 <= t < BYTE_VOCAB).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        if 0 <= token_id < 128:
            return chr(token_id)
        return f"bytes:\\x{token_id:02x}" if token_id < BYTE_VOCAB else ""

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> Detokenizer:
        return _ByteDetokenizer()


class _ByteDetokenizer(Detokenizer):
    """Python's incremental UTF-8 decoder: it holds back exactly an incomplete character."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, ids: Sequence[int]) -> str:
        return self._decoder.decode(bytes(int(t) for t in ids if 0 <= t < BYTE_VOCAB))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` package) and the files beside it.

    Args:
      path: a directory with ``tokenizer.json``, or the ``tokenizer.json`` file.
    """

    def __init__(self, path):
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:
            raise ConfigError(f"{path} has a {TOKENIZER_FILE}, which needs the tokenizers package: "
                              "pip install tokenizers") from None
        path = Path(path)
        directory, file = (path.parent, path) if path.is_file() else (path, path / TOKENIZER_FILE)
        try:
            self._tokenizer = RustTokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception for a file it cannot read
            raise ConfigError(f"{file} is not a tokenizer.json the tokenizers package reads: {err}") from None
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        config = _read_json(directory / "tokenizer_config.json")
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        eos = [] if self.eos_token is None else [self._tokenizer.token_to_id(self.eos_token)]
        for name in ("generation_config.json", "config.json"):
            value = _read_json(directory / name).get("eos_token_id")
            eos += value if isinstance(value, list) else [value]
        self.eos_token_ids = tuple(dict.fromkeys(int(t) for t in eos if isinstance(t, int)))
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        if self.eos_token is None and self.eos_token_id is not None:
            self.eos_token = self._tokenizer.id_to_token(self.eos_token_id)
        jinja_file = directory / "chat_template.jinja"
        self.chat_template = jinja_file.read_text() if jinja_file.is_file() else _named_template(
            config.get("chat_template"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(t) for t in ids], skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        text = self._tokenizer.decode([int(token_id)], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text
        piece = self._tokenizer.id_to_token(int(token_id)) or ""
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece.encode("utf-8"))

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        # a chat template writes the special tokens (BOS) itself
        return self.encode(self.apply_chat_template(messages), add_special_tokens=not self.renders_template)

    @property
    def renders_template(self) -> bool:
        """Whether ``apply_chat_template`` renders the tokenizer's own template (it has one and
        jinja2 is installed) rather than ``DEFAULT_CHAT_TEMPLATE``."""
        return self.chat_template is not None and _has_jinja2()

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str:
        if not self.renders_template:
            return super().apply_chat_template(messages)
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=True, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "")


def _has_jinja2() -> bool:
    return importlib.util.find_spec("jinja2") is not None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not JSON ({err})") from None
    return value if isinstance(value, dict) else {}


def _token_content(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    return token.get("content") if isinstance(token, dict) else token


def _named_template(template) -> str | None:
    """tokenizer_config.json's ``chat_template``: a string, or a list of named ones (the ``default``)."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template
