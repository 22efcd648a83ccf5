"""Tokenizers for Mixtral-style models.

`load_tokenizer` reads a SentencePiece `tokenizer.model` or a Hugging Face `tokenizer.json` and returns a
`Tokenizer` that encodes, decodes and turns a chat (a list of role/content messages) into prompt ids in the
format the tokenizer calls for (mixtral.chat_format: Mistral's v1, v3 or v7 instruct format, or the Jinja
`chat_template`). `StreamingDetokenizer` turns generated ids into text one token at a time.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

from .chat_format import (
    CHAT_FORMATS,
    MIXTRAL_V1_CHAT_TEMPLATE,
    check_chat,
    compile_template,
    mistral_chat_ids,
    mistral_generation,
    render_template,
)
from .errors import MixtralError
from .gguf_file import is_gguf, tokenizer_parts
from .tokenizer_backends import HFTokenizersBackend, SentencePieceBackend, check_size

__all__ = ["MIXTRAL_V1_CHAT_TEMPLATE", "StreamingDetokenizer", "Tokenizer", "load_tokenizer",
           "mistral_v1_tokenizer_path"]


class Tokenizer:
    """A loaded tokenizer; create it with `load_tokenizer`.

    Attributes: `vocab_size`, `bos_id`, `eos_id`, `eos_ids` (every id that ends generation), `bos_token`,
    `eos_token`, `add_bos` (whether a prompt starts with BOS: `with_bos`), `chat_template` (Jinja source or None),
    `chat_format` (how chats are encoded: "v1", "v3", "v7" or "template"; see mixtral.chat_format) and
    `mistral_v1` (chat_format == "v1").
    """

    def __init__(
        self,
        backend: SentencePieceBackend | HFTokenizersBackend,
        *,
        bos_id: int,
        eos_id: int,
        extra_eos_ids: set[int] | None = None,
        chat_template: str | None = None,
        chat_format: str = "template",
        add_bos: bool = True,
    ):
        if chat_format not in CHAT_FORMATS:
            raise MixtralError(f"unknown chat format {chat_format!r} (known: {', '.join(CHAT_FORMATS)})")
        self._backend = backend
        self.vocab_size: int = backend.size
        self.bos_id, self.eos_id = bos_id, eos_id
        self.eos_ids: set[int] = {eos_id} | set(extra_eos_ids or ())
        self.bos_token, self.eos_token = backend.piece(bos_id), backend.piece(eos_id)
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.chat_format = chat_format
        self._template = None

    @property
    def mistral_v1(self) -> bool:
        """True when chats are encoded in mistral-common's exact v1 format."""
        return self.chat_format == "v1"

    def encode(self, text: str, add_bos: bool = False, *, parse_special: bool = False) -> list[int]:
        """Encode `text` to ids; `add_bos` puts `bos_id` first.

        Special-token strings such as "</s>" or "[INST]" in `text` are ordinary text unless `parse_special` is
        True; then each becomes its id and each run of text between them is encoded on its own. For Mistral's
        instruct tokenizers (v3, v7) one space on each side of a special token is part of its formatting:
        "<s>[INST] Hi [/INST]" and "<s>[INST]Hi[/INST]" both give [bos, [INST], ▁Hi, [/INST]].
        """
        ids = self._backend.encode(text, parse_special)
        return [self.bos_id, *ids] if add_bos else ids

    def with_bos(self, ids: list[int]) -> list[int]:
        """A prompt's ids starting with exactly one BOS; as they are for a tokenizer that adds none (`add_bos`
        False: a GGUF file's vocabulary that says so, as those of the GPT-2 and Qwen 2 families do by default)."""
        if not self.add_bos:
            return list(ids)
        start = 0
        while start < len(ids) and ids[start] == self.bos_id:
            start += 1
        return [self.bos_id, *ids[start:]]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Decode ids to text, dropping special tokens, or writing them out (e.g. "<s>") if not `skip_special`.

        As in SentencePiece, the first token's leading space is dropped. With special tokens kept, each run of
        ordinary tokens between them is decoded alone (for Mistral's instruct tokenizers written as
        "[INST] text[/INST]": a space after a special token, and one more before the next if the text ends in
        a space), so that `encode(text, parse_special=True)` gives ids back.
        """
        special = self._backend.special_ids
        if skip_special:
            return self._backend.decode([i for i in ids if i not in special])
        groups = [(is_special, list(group)) for is_special, group in itertools.groupby(ids, key=special.__contains__)]
        parts: list[str] = []
        for n, (is_special, group) in enumerate(groups):
            if is_special:
                parts += map(self._backend.piece, group)
                continue
            text = self._backend.decode(group)
            if self._backend.separators:  # the spaces encode() takes as formatting (see there)
                after, before = n > 0, n < len(groups) - 1
                text = (" " if after else "") + text + (" " if before and text.endswith(" ") else "")
            parts.append(text)
        return "".join(parts)

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id `i` (e.g. "▁Hello" or "<0xF0>")."""
        if not 0 <= i < self.vocab_size:
            raise MixtralError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._backend.piece(i)

    def is_special(self, i: int) -> bool:
        """True for control tokens such as <s>, </s>, <unk> and [INST], which `decode` skips by default."""
        return i in self._backend.special_ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Encode a chat to prompt ids that start with exactly one BOS (`with_bos`), in the tokenizer's `chat_format`.

        `messages` are dicts {"role": "system" | "user" | "assistant", "content": str}: an optional first
        system message, then user and assistant turns alternating, starting with user. With
        `add_generation_prompt` the last message must be from the user (the model answers next); without
        it the chat may end with an answer (for training data). Every answer is followed by the EOS token; an
        empty answer is just EOS (mistral-common refuses those). In the Mistral formats text in messages is
        always text: "[INST]" or "</s>" typed by a user never becomes a control token (in rendered template
        text it cannot be told from the template's own). Raises MixtralError for a malformed chat, or a chat
        template that fails or leaves out the system prompt.
        """
        system, turns = check_chat(messages, add_generation_prompt)
        if self.chat_format != "template":
            return mistral_chat_ids(self.chat_format, system, turns, encode=self.encode, bos_id=self.bos_id,
                                    eos_id=self.eos_id, control_id=self._backend.control_id)
        if self._template is None:
            self._template = compile_template(self.chat_template or MIXTRAL_V1_CHAT_TEMPLATE)
        text = render_template(self._template, messages, system, add_generation_prompt, self.bos_token,
                               self.eos_token)
        return self.with_bos(self.encode(text, parse_special=True))

    def chat_prompt_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat prompt as text with special tokens written out ("<s>[INST] ... [/INST]").

        This is `decode(apply_chat_template(...), skip_special=False)`, for servers that take prompt text:
        `encode(text, parse_special=True)` gives the same ids back.
        """
        return self.decode(self.apply_chat_template(messages, add_generation_prompt), skip_special=False)


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
    check_size(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MixtralError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise MixtralError(f"{path} must hold a JSON object")
    return data


def _dummy_prefix(backend) -> bool:
    """True for SentencePiece-style vocabularies, whose encoding of "a" starts with "▁" (Mistral's v1-v7
    SentencePiece models and their tokenizer.json conversions). Mistral's tekken vocabularies have no dummy
    prefix, and every one of them carries all of Mistral's control tokens whatever instruct version it follows
    ([SYSTEM_PROMPT] included), so their control tokens do not tell the chat format."""
    ids = backend.encode("a", False)
    return bool(ids) and backend.piece(ids[0]).startswith("\u2581")


def _backend(path: Path, requested: str | None) -> tuple[SentencePieceBackend | HFTokenizersBackend, bool]:
    """The backend for a tokenizer file, or for the right file of a model directory, and whether it is a
    tokenizer.json that adds tokens of its own to a Mistral instruct tokenizer.model beside it (a fine-tune:
    its chat template, not Mistral's format, is what it was trained on).

    A directory's `tokenizer.model` is used when a Mistral format is requested, or when it is one of Mistral's
    instruct tokenizers (it is the exact SentencePiece model mistral-common encodes with) and the directory's
    `tokenizer.json` has no more tokens than it (a fine-tune that added tokens of its own keeps its json and its
    template); else `tokenizer.json` comes first.
    """
    if not path.is_dir():
        return (HFTokenizersBackend(path) if path.name.endswith(".json") else SentencePieceBackend(path)), False
    model, hf = path / "tokenizer.model", path / "tokenizer.json"
    if model.is_file() and (requested in ("v1", "v3", "v7") or not hf.is_file()):
        return SentencePieceBackend(model), False
    if model.is_file() and requested is None:
        try:
            sp = SentencePieceBackend(model)
        except MixtralError:  # an unreadable tokenizer.model beside a tokenizer.json: the json decides
            sp = None
        if sp is not None and _dummy_prefix(sp) and mistral_generation(sp.control_id) is not None:
            hf_backend = HFTokenizersBackend(hf)
            return (sp, False) if hf_backend.size <= sp.size else (hf_backend, True)
    if hf.is_file():
        return HFTokenizersBackend(hf), False
    if model.is_file():
        return SentencePieceBackend(model), False
    if (path / "tekken.json").is_file():
        raise MixtralError(f"{path} has only tekken.json: Mistral's tekken tokenizer is not supported; a "
                           "tokenizer.json converted from it (as in Hugging Face repositories) is")
    raise MixtralError(f"no tokenizer.json or tokenizer.model in {path}")


def load_tokenizer(path: str | Path, *, mistral_v1: bool | None = None, chat_format: str | None = None) -> Tokenizer:
    """Load a tokenizer from a model directory, a `tokenizer.json`, a SentencePiece `tokenizer.model` or a GGUF file
    (its vocabulary and `tokenizer.chat_template`; gguf_file.py).

    In a directory, `tokenizer.json` is used if present, else `tokenizer.model` (but see chat formats below).
    Next to it, `tokenizer_config.json` may set `bos_token`, `eos_token` and `chat_template`,
    `chat_template.jinja` overrides that template, and `generation_config.json`'s `eos_token_id` adds stop ids.

    Chat format (mixtral.chat_format), from the first of: `chat_format` ("v1", "v3", "v7" or "template");
    `mistral_v1` (True: "v1", False: "template"); tokenizer_config.json's `"mixtral_chat_format"`; and by
    default, from the tokenizer itself: "v7" or "v3" when it is a SentencePiece-style vocabulary with Mistral's
    instruct control tokens ([INST], [/INST], and [SYSTEM_PROMPT] for v7), whether or not there is a chat
    template, since mistral-common's encoding is what those models were trained on (a directory then prefers
    its `tokenizer.model`); "v1" for any other SentencePiece model without a chat template; else "template"
    (`MIXTRAL_V1_CHAT_TEMPLATE` if there is none). A v1 tokenizer cannot be told from other 32,000-piece ones
    by its file, so with a chat template it keeps the template unless told "v1"; nor can a tekken one's
    version (see `_dummy_prefix`), so a tekken tokenizer.json uses its template.

    Raises MixtralError for missing or unreadable files, an unknown chat format, or a Mistral format the
    tokenizer cannot encode ("v3"/"v7" without their control tokens, "v1" with [INST] as a control token).
    """
    path = Path(path)
    if not path.exists():
        raise MixtralError(f"tokenizer not found: {path} does not exist")
    folder = path if path.is_dir() else path.parent
    config_file = folder / "tokenizer_config.json"
    gguf = is_gguf(path)  # a GGUF file holds its own tokenizer and template: nothing beside it is read
    config = _read_json(config_file) if config_file.is_file() and not gguf else {}
    configured = config.get("mixtral_chat_format")
    if configured is not None and configured not in CHAT_FORMATS:
        raise MixtralError(f"{config_file}: unknown mixtral_chat_format {configured!r} "
                           f"(known: {', '.join(CHAT_FORMATS)})")
    if chat_format is not None and chat_format not in CHAT_FORMATS:
        raise MixtralError(f"unknown chat format {chat_format!r} (known: {', '.join(CHAT_FORMATS)})")
    requested = chat_format or {True: "v1", False: "template", None: None}[mistral_v1] or configured

    add_bos, extra = config.get("add_bos_token") is not False, set()  # (Hugging Face's key; true unless false)
    if gguf:
        vocab = tokenizer_parts(path)
        add_bos, extra = vocab.add_bos, set(vocab.end_ids)
        backend = (SentencePieceBackend(path, model_proto=vocab.sentencepiece) if vocab.bpe is None
                   else HFTokenizersBackend(path, tokenizer=vocab.bpe))
        extended = False
        if vocab.bos_id is not None:
            backend.default_bos = vocab.bos_id
        if vocab.eos_id is not None:
            backend.default_eos = vocab.eos_id
        config = {"chat_template": vocab.template} if vocab.template else {}
    else:
        backend, extended = _backend(path, requested)
    generation = mistral_generation(backend.control_id) if _dummy_prefix(backend) and not extended else None
    backend.separators = generation is not None

    template = config.get("chat_template")
    if isinstance(template, list):  # a list of named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if (folder / "chat_template.jinja").is_file() and not gguf:
        try:
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MixtralError(f"cannot read {folder / 'chat_template.jinja'}: {e}") from e
    if template is not None and not isinstance(template, str):
        raise MixtralError(f"{config_file}: chat_template must be a string")

    if requested is None:
        if generation is not None:
            requested = generation
        else:
            requested = "v1" if isinstance(backend, SentencePieceBackend) and template is None else "template"
    if requested == "v1" and generation is not None:
        raise MixtralError(f"the v1 chat format spells [INST] as text, but in this tokenizer it is a control "
                           f"token: use chat format {generation!r}")
    if requested in ("v3", "v7") and (generation is None or (requested == "v7" and generation != "v7")):
        needs = "[INST], [/INST]" + (", [SYSTEM_PROMPT], [/SYSTEM_PROMPT]" if requested == "v7" else "")
        raise MixtralError(f"the {requested} chat format needs a SentencePiece-style tokenizer with the control "
                           f"tokens {needs}, and this tokenizer is not one")

    ids = {}
    for name, default in (("bos_token", backend.default_bos), ("eos_token", backend.default_eos)):
        text = config.get(name)
        text = text.get("content") if isinstance(text, dict) else text  # may be a serialized AddedToken
        token = backend.token_id(text) if text is not None else default
        if token is None or token < 0:
            raise MixtralError(f"{path}: no {name} (set {name} in tokenizer_config.json)")
        ids[name] = token
    if (folder / "generation_config.json").is_file() and not gguf:
        eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        extra = {eos} if isinstance(eos, int) else {i for i in eos or () if isinstance(i, int)}
    return Tokenizer(
        backend,
        bos_id=ids["bos_token"],
        eos_id=ids["eos_token"],
        extra_eos_ids=extra,
        chat_template=template,
        chat_format=requested,
        add_bos=add_bos,
    )
