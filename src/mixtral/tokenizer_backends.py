"""The two tokenizer backends behind `mixtral.tokenizer.Tokenizer`: a SentencePiece `tokenizer.model` and a
Hugging Face `tokenizer.json` (the `tokenizers` library).

Both offer the same small interface: `size`, `special_ids`, `default_bos`/`default_eos`, `encode(text,
parse_special)`, `decode(ids)` (special ids included, first leading space dropped), `piece(i)`,
`token_id(piece)`, `control_id(piece)` (the id only if the piece is a control/special token), and
`separators`, which `load_tokenizer` sets for Mistral's instruct tokenizers (see `_encode_runs`).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from .errors import MixtralError


MAX_TOKENIZER_BYTES = 256 * 2**20  # the largest real tokenizer files are a few tens of MB (Llama 3's json: 9 MB)


def check_size(path: Path, limit: int = MAX_TOKENIZER_BYTES) -> None:
    """Refuse a tokenizer or config file too large to be one, before it is read into memory."""
    try:
        size = Path(path).stat().st_size
    except OSError as exc:
        raise MixtralError(f"cannot read {path}: {exc.strerror or exc}") from None
    if size > limit:
        raise MixtralError(f"{path} is {size:,} bytes: too large for a tokenizer file (at most {limit:,})")


def _split_on(specials) -> re.Pattern | None:
    """A regex that splits text around any of the `specials` strings (longest first)."""
    specials = sorted(specials, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None


def _encode_runs(parts: list[str], encode_plain, special_id, separators: bool) -> list[int]:
    """Ids of `parts` (re.split output: text runs at even indices, special-token strings at odd ones).

    Each text run is encoded on its own, so it gets its own dummy-prefix space. With `separators` (Mistral's
    instruct tokenizers), one space on each side of a special token belongs to the token's formatting, not to
    the text: "[INST] Hello [/INST]", "[INST] Hello[/INST]" and "[INST]Hello[/INST]" are the same ids.
    """
    ids: list[int] = []
    last = len(parts) - 1
    for n, part in enumerate(parts):
        if n % 2:
            ids.append(special_id(part))
            continue
        if separators:
            part = part[1:] if n > 0 and part.startswith(" ") else part
            part = part[:-1] if n < last and part.endswith(" ") else part
        if part:
            ids.extend(encode_plain(part))
    return ids


class SentencePieceBackend:
    """SentencePiece backend: plain-text encoding with the dummy prefix, byte fallback on decode."""

    separators = False  # set by load_tokenizer for Mistral's instruct tokenizers (see _encode_runs)

    def __init__(self, path: Path | None, model_proto: bytes | None = None):
        """From a tokenizer.model file, or from a serialized model (`model_proto`; path then names its source)."""
        import sentencepiece

        if model_proto is None:
            check_size(path)
        try:
            self.sp = (sentencepiece.SentencePieceProcessor(model_file=str(path)) if model_proto is None
                       else sentencepiece.SentencePieceProcessor(model_proto=model_proto))
        except (RuntimeError, OSError) as e:
            raise MixtralError(f"cannot read SentencePiece model {path}: {e}") from e
        self.size = self.sp.get_piece_size()
        self.special_ids = frozenset(
            i for i in range(self.size) if self.sp.is_control(i) or self.sp.is_unknown(i)
        )
        self.default_bos, self.default_eos = self.sp.bos_id(), self.sp.eos_id()
        self._split = _split_on(self.sp.id_to_piece(i) for i in self.special_ids)

    def encode(self, text: str, parse_special: bool) -> list[int]:
        if not parse_special or self._split is None:
            return self.sp.encode(text)
        # Like Hugging Face's legacy Llama tokenizers: each text run between special tokens is encoded on its
        # own, so it gets its own dummy-prefix space.
        return _encode_runs(self._split.split(text), self.sp.encode, self.sp.piece_to_id, self.separators)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def token_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def control_id(self, piece: str) -> int | None:
        i = self.token_id(piece)
        return i if i is not None and self.sp.is_control(i) else None


class HFTokenizersBackend:
    """Backend for a Hugging Face `tokenizer.json` (the `tokenizers` library)."""

    separators = False  # set by load_tokenizer for Mistral's instruct tokenizers (see _encode_runs)

    def __init__(self, path: Path | None, tokenizer=None):
        """From a tokenizer.json file, or from a `tokenizers.Tokenizer` built elsewhere (a GGUF file's vocabulary)."""
        import tokenizers

        if tokenizer is not None:
            self.tok = tokenizer
        else:
            check_size(path)
            try:
                self.tok = tokenizers.Tokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises plain Exception for bad JSON
                raise MixtralError(f"cannot read tokenizer file {path}: {e}") from e
        self.size = self.tok.get_vocab_size(with_added_tokens=True)
        added = self.tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self.default_bos, self.default_eos = self.token_id("<s>"), self.token_id("</s>")
        self._split = _split_on(added[i].content for i in self.special_ids)
        self._lock = threading.Lock()  # encode_special_tokens is shared state

    def _encode(self, text: str, parse_special: bool) -> list[int]:
        with self._lock:
            self.tok.encode_special_tokens = not parse_special
            return self.tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, parse_special: bool) -> list[int]:
        if not (parse_special and self.separators and self._split is not None):
            return self._encode(text, parse_special)  # special tokens found by the tokenizers library itself
        return _encode_runs(self._split.split(text), lambda run: self._encode(run, False), self.tok.token_to_id,
                            True)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def piece(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def token_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def control_id(self, piece: str) -> int | None:
        i = self.token_id(piece)
        return i if i in self.special_ids else None
