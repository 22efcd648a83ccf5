"""Tokenizers and chat prompts for Mixtral-style models.

`load_tokenizer` reads a SentencePiece `tokenizer.model` or a Hugging Face `tokenizer.json` and returns a
`Tokenizer` that encodes, decodes and turns a chat (a list of role/content messages) into prompt ids.
`StreamingDetokenizer` turns generated ids into text one token at a time.

Chat prompts use one of two formats:

* Mistral's v1 instruct format, built directly from ids so that it equals mistral-common's
  `MistralTokenizer.v1()` encoding token for token:
  `<s>[INST] {system}\\n\\n{user 1} [/INST] {answer 1}</s>[INST] {user 2} [/INST]`. Every "[INST] ... [/INST]"
  block and every answer is encoded as a separate piece of text (so each starts with SentencePiece's
  dummy-prefix space); each answer is followed by `</s>`. The system prompt (if non-empty) goes in front of
  the FIRST user message, separated by a blank line.
* The tokenizer's own Jinja `chat_template`, rendered in a sandbox.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import re
import threading
from pathlib import Path
from typing import Any

from mixtral.errors import MixtralError

# The v1 format as a Jinja template, for tokenizer_config.json: transformers' apply_chat_template gives the
# same ids as mistral-common v1 with a legacy Llama/Mistral tokenizer (except where Hugging Face's converted
# tokenizer.json itself splits runs of spaces differently from SentencePiece). `' ' + answer` reproduces the
# dummy-prefix space that mistral-common gets by encoding the answer on its own.
MIXTRAL_V1_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in turns %}"
    "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') %}{{- raise_exception("
    "'After an optional first system message, roles must alternate user/assistant/..., starting with user.')"
    " }}{%- endif %}"
    "{%- if message['role'] == 'user' and loop.first and system %}"
    "{{- '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)

_ROLES = ("system", "user", "assistant")


class _SentencePiece:
    """SentencePiece backend: plain-text encoding with the dummy prefix, byte fallback on decode."""

    def __init__(self, path: Path):
        import sentencepiece

        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise MixtralError(f"cannot read SentencePiece model {path}: {e}") from e
        self.size = self.sp.get_piece_size()
        self.special_ids = frozenset(
            i for i in range(self.size) if self.sp.is_control(i) or self.sp.is_unknown(i)
        )
        self.default_bos, self.default_eos = self.sp.bos_id(), self.sp.eos_id()
        specials = sorted((self.sp.id_to_piece(i) for i in self.special_ids), key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def encode(self, text: str, parse_special: bool) -> list[int]:
        if not parse_special or self._split is None:
            return self.sp.encode(text)
        ids: list[int] = []
        # Like Hugging Face's legacy Llama tokenizers: each text run between special tokens is encoded on its
        # own, so it gets its own dummy-prefix space.
        for n, part in enumerate(self._split.split(text)):
            if n % 2:
                ids.append(self.sp.piece_to_id(part))
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def token_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None


class _HFTokenizers:
    """Backend for a Hugging Face `tokenizer.json` (the `tokenizers` library)."""

    def __init__(self, path: Path):
        import tokenizers

        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception for bad JSON
            raise MixtralError(f"cannot read tokenizer file {path}: {e}") from e
        self.size = self.tok.get_vocab_size(with_added_tokens=True)
        added = self.tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self.default_bos, self.default_eos = self.token_id("<s>"), self.token_id("</s>")
        self._lock = threading.Lock()  # encode_special_tokens is shared state

    def encode(self, text: str, parse_special: bool) -> list[int]:
        with self._lock:
            self.tok.encode_special_tokens = not parse_special
            return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def piece(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def token_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)


@functools.lru_cache(maxsize=1)
def _jinja_env():
    """The sandboxed Jinja environment for chat templates (jinja2 is imported only when needed)."""
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class StrictSandbox(ImmutableSandboxedEnvironment):
        # The stock sandbox turns an unsafe attribute into a silent undefined value; fail loudly instead.
        def unsafe_undefined(self, obj: Any, attribute: str):
            raise SecurityError(f"access to {attribute!r} of a {type(obj).__name__} is not allowed")

    return StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])


def _raise_exception(message: str) -> None:
    raise MixtralError(f"chat template: {message}")


def _check_chat(messages: list[dict], add_generation_prompt: bool) -> tuple[str, list[dict]]:
    """Validate a chat; return (system prompt or "", the alternating user/assistant turns)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MixtralError("a chat needs at least one message (a list of {'role': ..., 'content': ...})")
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise MixtralError(
                f"message {n} must be a dict with 'role' in {_ROLES} and a string 'content', got {m!r}"
            )
    system, turns, first = "", messages, 0
    if messages[0]["role"] == "system":
        system, turns, first = messages[0]["content"], messages[1:], 1
    for n, m in enumerate(turns):
        want = "user" if n % 2 == 0 else "assistant"
        if m["role"] != want:
            raise MixtralError(
                f"message {n + first} has role {m['role']!r} where {want!r} was expected: after an optional "
                "first system message, roles must alternate user/assistant/user/..., starting with user"
            )
    if not turns:
        raise MixtralError("the chat has a system message but no user message")
    if add_generation_prompt and turns[-1]["role"] != "user":
        raise MixtralError("the last message must come from the user when asking the model for a reply")
    return system, turns


class Tokenizer:
    """A loaded tokenizer; create it with `load_tokenizer`.

    Attributes: `vocab_size`, `bos_id`, `eos_id`, `eos_ids` (every id that ends generation), `bos_token`,
    `eos_token`, `chat_template` (Jinja source or None) and `mistral_v1` (True when chats are encoded in
    mistral-common's exact v1 format instead of with the template).
    """

    def __init__(
        self,
        backend: _SentencePiece | _HFTokenizers,
        *,
        bos_id: int,
        eos_id: int,
        extra_eos_ids: set[int] | None = None,
        chat_template: str | None = None,
        mistral_v1: bool = False,
    ):
        self._backend = backend
        self.vocab_size: int = backend.size
        self.bos_id, self.eos_id = bos_id, eos_id
        self.eos_ids: set[int] = {eos_id} | set(extra_eos_ids or ())
        self.bos_token, self.eos_token = backend.piece(bos_id), backend.piece(eos_id)
        self.chat_template = chat_template
        self.mistral_v1 = mistral_v1
        self._template = None

    def encode(self, text: str, add_bos: bool = False, *, parse_special: bool = False) -> list[int]:
        """Encode `text` to ids; `add_bos` puts `bos_id` first.

        Special-token strings such as "</s>" in `text` are ordinary text unless `parse_special` is True.
        """
        ids = self._backend.encode(text, parse_special)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Decode ids to text, dropping special tokens, or writing them out (e.g. "<s>") if not `skip_special`.

        As in SentencePiece, the first token's leading space is dropped; with special tokens kept, each run of
        ordinary tokens between them is decoded alone, so `encode(text, parse_special=True)` gives ids back.
        """
        special = self._backend.special_ids
        if skip_special:
            return self._backend.decode([i for i in ids if i not in special])
        parts: list[str] = []
        for is_special, group in itertools.groupby(ids, key=special.__contains__):
            group = list(group)
            parts += map(self._backend.piece, group) if is_special else [self._backend.decode(group)]
        return "".join(parts)

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id `i` (e.g. "▁Hello" or "<0xF0>")."""
        if not 0 <= i < self.vocab_size:
            raise MixtralError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._backend.piece(i)

    def is_special(self, i: int) -> bool:
        """True for control tokens such as <s>, </s> and <unk>, which `decode` skips by default."""
        return i in self._backend.special_ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Encode a chat to prompt ids that start with exactly one BOS.

        `messages` are dicts {"role": "system" | "user" | "assistant", "content": str}: an optional first
        system message, then user and assistant turns alternating, starting with user. With
        `add_generation_prompt` the last message must be from the user (the model answers next); without
        it the chat may end with an answer (for training data). Every answer is followed by the EOS token; an
        empty answer is just EOS (mistral-common refuses those). Raises MixtralError for a malformed chat.
        """
        system, turns = _check_chat(messages, add_generation_prompt)
        if self.mistral_v1:
            return self._v1_ids(system, turns)
        text = self._render(messages, add_generation_prompt)
        ids = self.encode(text, parse_special=True)
        while ids and ids[0] == self.bos_id:
            ids = ids[1:]
        return [self.bos_id, *ids]

    def chat_prompt_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat prompt as text with special tokens written out ("<s>[INST] ... [/INST]").

        This is `decode(apply_chat_template(...), skip_special=False)`, for servers that take prompt text.
        """
        return self.decode(self.apply_chat_template(messages, add_generation_prompt), skip_special=False)

    def _v1_ids(self, system: str, turns: list[dict]) -> list[int]:
        # mistral-common v1: system prompt + "\n\n" before the first user message (only when non-empty);
        # "[INST] {content} [/INST]" and each answer are encoded separately; EOS after every answer.
        ids = [self.bos_id]
        for n, m in enumerate(turns):
            if m["role"] == "user":
                content = f"{system}\n\n{m['content']}" if n == 0 and system else m["content"]
                ids += self.encode(f"[INST] {content} [/INST]")
            else:
                ids += [*self.encode(m["content"]), self.eos_id]
        return ids

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            if self._template is None:
                self._template = _jinja_env().from_string(self.chat_template or MIXTRAL_V1_CHAT_TEMPLATE)
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                raise_exception=_raise_exception,
            )
        except Exception as e:  # the template is data: any failure in it (sandbox, syntax, ...) is the user's
            if isinstance(e, MixtralError):
                raise
            raise MixtralError(f"the chat template failed: {type(e).__name__}: {e}") from e


class StreamingDetokenizer:
    """Turns generated ids into text incrementally; joined, the pieces equal `tokenizer.decode(ids)`.

    Special tokens are skipped, as in `decode`. Text is held back while it ends in an incomplete UTF-8
    character (e.g. after byte-fallback tokens like <0xF0>). Each call decodes only the ids since the last
    output plus those of the last output as context, so the leading-space rule never touches new text.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []  # ids[:_done] were output last time and serve as context; the rest is new
        self._done = 0

    def _delta(self) -> str:
        before = self._tok.decode(self._ids[: self._done])
        after = self._tok.decode(self._ids)
        return after[len(before) :] if len(after) > len(before) else ""

    def add(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (possibly "")."""
        if self._tok.is_special(token_id):
            return ""
        self._ids.append(token_id)
        delta = self._delta()
        if not delta or delta.endswith("\ufffd"):
            return ""  # nothing new yet, or the text ends inside an incomplete multi-byte character
        del self._ids[: self._done]  # older context is no longer needed
        self._done = len(self._ids)
        return delta

    def flush(self) -> str:
        """Return the text still held back (an incomplete character becomes U+FFFD) and reset."""
        delta = self._delta()
        self._ids, self._done = [], 0
        return delta


def mistral_v1_tokenizer_path() -> Path:
    """Path of Mixtral's v1 SentencePiece model as shipped in the mistral-common package.

    Only tests and data preparation need it; raises MixtralError if mistral-common is not installed.
    """
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise MixtralError("mistral-common is not installed; install it with: pip install mistral-common")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise MixtralError(f"{path} is missing; reinstall mistral-common (pip install -U mistral-common)")
    return path


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MixtralError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise MixtralError(f"{path} must hold a JSON object")
    return data


def load_tokenizer(path: str | Path, *, mistral_v1: bool | None = None) -> Tokenizer:
    """Load a tokenizer from a model directory, a `tokenizer.json` or a SentencePiece `tokenizer.model`.

    In a directory, `tokenizer.json` is used if present, else `tokenizer.model`. Next to it,
    `tokenizer_config.json` may set `bos_token`, `eos_token` and `chat_template`, `chat_template.jinja`
    overrides that template, and `generation_config.json`'s `eos_token_id` adds stop ids.

    Chats use mistral-common's exact v1 encoding (module docstring) if `mistral_v1` is True or, by default,
    if tokenizer_config.json has `"mixtral_chat_format": "v1"` (a directory then prefers `tokenizer.model`)
    or the tokenizer is a SentencePiece model without a chat template. Otherwise the chat template is
    rendered, or `MIXTRAL_V1_CHAT_TEMPLATE` if there is none. Missing or unreadable files: MixtralError.
    """
    path = Path(path)
    if not path.exists():
        raise MixtralError(f"tokenizer not found: {path} does not exist")
    folder = path if path.is_dir() else path.parent
    config_file = folder / "tokenizer_config.json"
    config = _read_json(config_file) if config_file.is_file() else {}
    chat_format = config.get("mixtral_chat_format")
    if chat_format not in (None, "v1"):
        raise MixtralError(f"{config_file}: unknown mixtral_chat_format {chat_format!r} (only 'v1' exists)")
    if mistral_v1 is None and chat_format == "v1":
        mistral_v1 = True

    file = path
    if path.is_dir():
        order = ("tokenizer.model", "tokenizer.json") if mistral_v1 else ("tokenizer.json", "tokenizer.model")
        found = [path / name for name in order if (path / name).is_file()]
        if not found:
            raise MixtralError(f"no tokenizer.json or tokenizer.model in {path}")
        file = found[0]
    backend = _HFTokenizers(file) if file.name.endswith(".json") else _SentencePiece(file)

    template = config.get("chat_template")
    if isinstance(template, list):  # a list of named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if (folder / "chat_template.jinja").is_file():
        try:
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MixtralError(f"cannot read {folder / 'chat_template.jinja'}: {e}") from e
    if template is not None and not isinstance(template, str):
        raise MixtralError(f"{config_file}: chat_template must be a string")
    if mistral_v1 is None:
        mistral_v1 = isinstance(backend, _SentencePiece) and template is None

    ids = {}
    for name, default in (("bos_token", backend.default_bos), ("eos_token", backend.default_eos)):
        text = config.get(name)
        text = text.get("content") if isinstance(text, dict) else text  # may be a serialized AddedToken
        token = backend.token_id(text) if text is not None else default
        if token is None or token < 0:
            raise MixtralError(f"{file}: no {name} (set {name} in tokenizer_config.json)")
        ids[name] = token
    extra: set[int] = set()
    if (folder / "generation_config.json").is_file():
        eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        extra = {eos} if isinstance(eos, int) else {i for i in eos or () if isinstance(i, int)}
    return Tokenizer(
        backend,
        bos_id=ids["bos_token"],
        eos_id=ids["eos_token"],
        extra_eos_ids=extra,
        chat_template=template,
        mistral_v1=bool(mistral_v1),
    )
