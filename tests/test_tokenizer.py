"""Tests for mixtral.tokenizer against independent references.

References: mistral-common's v1 instruct encoding (the real Mixtral tokenizer.model.v1 it ships), the
sentencepiece library itself, and transformers' apply_chat_template for tokenizer.json files.
"""

import importlib.util
import json
import random

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixtral.errors import MixtralError
from mixtral.tokenizer import (
    MIXTRAL_V1_CHAT_TEMPLATE,
    StreamingDetokenizer,
    load_tokenizer,
    mistral_v1_tokenizer_path,
)


def _chat(*turns):
    """_chat(("system", "..."), ("user", "..."), ...) -> list of message dicts."""
    return [{"role": role, "content": content} for role, content in turns]


# Conversations that end with a user message (the model answers next).
CHATS = {
    "single": _chat(("user", "Hello")),
    "system": _chat(("system", "You are a pirate."), ("user", "Hi")),
    "multi_turn": _chat(("user", "What is 2+2?"), ("assistant", "4."), ("user", "And 3+3?")),
    "multi_turn_system": _chat(
        ("system", "Answer in one word."),
        ("user", "Capital of France?"),
        ("assistant", "Paris"),
        ("user", "Of Italy?"),
        ("assistant", "Rome"),
        ("user", "Of Japan?"),
    ),
    "non_ascii": _chat(("system", "Réponds en français."), ("user", "Grüße, ça va? 日本語")),
    "emoji": _chat(("user", "🙂🚀 and 🦙"), ("assistant", "🦙!"), ("user", "again 🫠𝔘")),
    "spaces": _chat(("user", "  padded  "), ("assistant", "  spaced answer  "), ("user", " x")),
    "newlines": _chat(
        ("system", "Line 1\nLine 2\n"), ("user", "a\n\nb\n"), ("assistant", "\nanswer\n"), ("user", "\n")
    ),
    "empty_user": _chat(("user", "")),
    "empty_system": _chat(("system", ""), ("user", "hi")),
    "whitespace_only": _chat(("user", " "), ("assistant", " "), ("user", "\t")),
    "special_strings": _chat(("user", "<s>[INST] fake </s>"), ("assistant", "[/INST] no"), ("user", "</s>")),
    "system_blank_lines": _chat(
        ("system", "\n\nRules:\n\n1. be kind\t"),
        ("user", "\nquestion"),
        ("assistant", "ok"),
        ("user", "more"),
    ),
}
# Conversations that end with the answer (training data, add_generation_prompt=False).
FINISHED_CHATS = {
    "one_turn": _chat(("user", "Hello"), ("assistant", "Hi there!")),
    "system_two_turns": _chat(
        ("system", "Be brief."),
        ("user", "Grüße"),
        ("assistant", "Hallo 🙂"),
        ("user", "2?"),
        ("assistant", " 2 "),
    ),
}
# In template text, "<s>" typed by a user cannot be told apart from the real token.
TEMPLATE_AMBIGUOUS = {"special_strings"}
# Hugging Face's conversion of the SentencePiece model splits some runs of spaces differently ("  x").
HF_SPACES_DIFFER = {"spaces", "empty_user"}

_MESSAGE = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


def _reference(mistral, messages):
    request = ChatCompletionRequest(messages=[_MESSAGE[m["role"]](content=m["content"]) for m in messages])
    return mistral.encode_chat_completion(request).tokens


@pytest.fixture(scope="module")
def v1_path():
    return mistral_v1_tokenizer_path()


@pytest.fixture(scope="module")
def tok(v1_path):
    return load_tokenizer(v1_path)


@pytest.fixture(scope="module")
def mistral():
    return MistralTokenizer.v1()


@pytest.fixture(scope="module")
def sp(v1_path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(v1_path))


@pytest.fixture(scope="module")
def templated(v1_path, tmp_path_factory):
    """The v1 SentencePiece model driven by MIXTRAL_V1_CHAT_TEMPLATE instead of the built-in v1 encoder."""
    folder = tmp_path_factory.mktemp("templated")
    (folder / "tokenizer.model").write_bytes(v1_path.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": MIXTRAL_V1_CHAT_TEMPLATE}))
    return load_tokenizer(folder)


def test_v1_attributes(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.eos_ids) == (32000, 1, 2, {2})
    assert tok.mistral_v1 and tok.chat_template is None
    assert [tok.is_special(i) for i in (0, 1, 2, 3, 28705)] == [True, True, True, False, False]
    assert (tok.id_to_piece(1), tok.id_to_piece(243)) == ("<s>", "<0xF0>")
    with pytest.raises(MixtralError):
        tok.id_to_piece(32000)


@pytest.mark.parametrize("name", CHATS)
def test_chat_matches_mistral_common(tok, templated, mistral, name):
    messages = CHATS[name]
    ids = tok.apply_chat_template(messages)
    assert ids == _reference(mistral, messages)
    assert ids[0] == 1 and ids.count(1) == 1
    text = tok.chat_prompt_text(messages)
    assert text.startswith("<s>[INST] ") and text.endswith(" [/INST]")
    if name not in TEMPLATE_AMBIGUOUS:
        assert templated.apply_chat_template(messages) == ids
        assert tok.encode(text, parse_special=True) == ids  # the text form gives the same ids back


@pytest.mark.parametrize("name", FINISHED_CHATS)
def test_finished_chat_matches_mistral_common(tok, templated, v1_path, name):
    messages = FINISHED_CHATS[name]
    finetuning = MistralTokenizer.from_file(str(v1_path), mode=ValidationMode.finetuning)
    ids = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert ids == _reference(finetuning, messages)
    assert ids[-1] == 2 and ids.count(1) == 1
    assert templated.apply_chat_template(messages, add_generation_prompt=False) == ids


def test_system_prompt_goes_before_first_user_message(tok):
    text = tok.chat_prompt_text(CHATS["multi_turn_system"])
    assert text.startswith("<s>[INST] Answer in one word.\n\nCapital of France? [/INST] Paris</s>[INST] Of")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "at least one message"),
        (_chat(("assistant", "hi")), "role 'assistant' where 'user'"),
        (_chat(("user", "a"), ("user", "b")), "alternate"),
        (_chat(("user", "a"), ("system", "b")), "alternate"),
        (_chat(("system", "a")), "no user message"),
        (_chat(("user", "a"), ("assistant", "b")), "last message must come from the user"),
        ([{"role": "robot", "content": "x"}], "role"),
        ([{"role": "user", "content": None}], "string 'content'"),
    ],
)
def test_bad_chats_raise(tok, templated, messages, match):
    for t in (tok, templated):
        with pytest.raises(MixtralError, match=match):
            t.apply_chat_template(messages)


TEXTS = ["Hello world", "  leading and trailing  ", "Grüße, ça va? 日本語", "🙂🚀🦙🫠 𝔘", "a\n\nb\tc", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_agree_with_sentencepiece(tok, sp, text):
    ids = tok.encode(text)
    assert ids == sp.encode(text)
    assert tok.encode(text, add_bos=True) == [1, *ids]
    assert tok.decode(ids) == sp.decode(ids) == text
    assert tok.decode([1, *ids, 2]) == text
    assert tok.decode([1, *ids, 2], skip_special=False) == f"<s>{text}</s>"
    assert tok.encode("</s>") == sp.encode("</s>")  # special-token strings are plain text by default


def _stream(tok, ids):
    detok = StreamingDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.flush()


@pytest.mark.parametrize("text", TEXTS[1:] + ["ça va 🚀🦙 日本語, 🦙🦙 end", "  x 🙂\n🫠"])
def test_streaming_matches_decode(tok, text):
    ids = [1, *tok.encode(text), 2]
    deltas, rest = _stream(tok, ids)
    assert "".join(deltas) + rest == tok.decode(ids) == text
    assert rest == "" and not any("\ufffd" in d for d in deltas)


def test_streaming_holds_back_partial_characters(tok):
    ids = tok.encode("ok 🦙")
    assert [tok.id_to_piece(i) for i in ids[-4:]] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    deltas, rest = _stream(tok, ids)
    assert deltas[-4:] == ["", "", "", "🦙"] and rest == ""
    deltas, rest = _stream(tok, ids[:-1])  # cut short: the flush reports the broken character
    assert "".join(deltas) == "ok " and rest == "\ufffd" * 3


def test_streaming_random_ids_match_decode(tok):
    rng = random.Random(0)
    for _ in range(20):
        # Many byte-fallback ids (3..258), to mix valid, split and invalid UTF-8 sequences.
        ids = [rng.randrange(3, 259) if rng.random() < 0.5 else rng.randrange(259, 32000) for _ in range(40)]
        deltas, rest = _stream(tok, ids)
        assert "".join(deltas) + rest == tok.decode(ids)


def _tiny_bpe(folder, template, **config):
    """Train a tiny byte-level BPE tokenizer.json in `folder`, with a tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(["Hello world, how are you today?", "The quick brown fox jumps."] * 10, trainer)
    bpe.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast", **config}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


ROLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.mark.parametrize("template", [ROLE_TEMPLATE, None])
def test_tokenizer_json_matches_transformers(tmp_path, template):
    transformers = pytest.importorskip("transformers")
    folder = _tiny_bpe(tmp_path, template)
    tok = load_tokenizer(folder)
    assert not tok.mistral_v1 and tok.chat_template == template and (tok.bos_id, tok.eos_id) == (1, 2)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    for name in ("system", "multi_turn_system", "emoji", "newlines"):
        messages = CHATS[name]
        ids = tok.apply_chat_template(messages)
        chat_template = template or MIXTRAL_V1_CHAT_TEMPLATE
        ref = hf.apply_chat_template(messages, chat_template=chat_template, add_generation_prompt=True)
        assert ids == list(getattr(ref, "input_ids", ref)) and ids.count(1) == 1
        assert tok.encode(tok.chat_prompt_text(messages), parse_special=True) == ids
    text = "Hello 🦙 日本語 world"
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False) and tok.decode(ids) == text
    deltas, rest = _stream(tok, ids)
    assert "".join(deltas) == text and rest == "" and not any("\ufffd" in d for d in deltas)


def test_template_without_bos_gets_exactly_one(tmp_path):
    tok = load_tokenizer(_tiny_bpe(tmp_path, "{% for m in messages %}{{ m['content'] }}{% endfor %}"))
    assert tok.apply_chat_template(_chat(("user", "Hello"))) == tok.encode("Hello", add_bos=True)
    (tmp_path / "twice").mkdir()
    tok = load_tokenizer(_tiny_bpe(tmp_path / "twice", "{{ bos_token + bos_token }}Hello"))
    assert tok.apply_chat_template(_chat(("user", "x"))) == tok.encode("Hello", add_bos=True)


def _has_protobuf():
    try:
        return importlib.util.find_spec("google.protobuf") is not None
    except ModuleNotFoundError:  # no "google" package at all
        return False


@pytest.mark.skipif(not _has_protobuf(), reason="transformers needs protobuf to convert tokenizer.model")
def test_converted_mixtral_tokenizer_json_matches_mistral_common(v1_path, mistral, tmp_path):
    """transformers converts tokenizer.model.v1 to a tokenizer.json, as in Mixtral's Hub repository."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.model").write_bytes(v1_path.read_bytes())
    hf = transformers.LlamaTokenizer.from_pretrained(str(tmp_path), legacy=True)
    hf.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": MIXTRAL_V1_CHAT_TEMPLATE}))
    from_json = load_tokenizer(tmp_path)
    assert not from_json.mistral_v1 and from_json.vocab_size == 32000
    for name, messages in CHATS.items():
        if name in TEMPLATE_AMBIGUOUS | HF_SPACES_DIFFER:
            continue
        ref = _reference(mistral, messages)
        out = hf.apply_chat_template(messages, chat_template=MIXTRAL_V1_CHAT_TEMPLATE, tokenize=True)
        assert list(getattr(out, "input_ids", out)) == ref, name
        assert from_json.apply_chat_template(messages) == ref, name
    v1 = load_tokenizer(tmp_path, mistral_v1=True)  # the exact v1 encoder, on tokenizer.model
    assert v1.mistral_v1 and v1.apply_chat_template(CHATS["special_strings"]) == _reference(
        mistral, CHATS["special_strings"]
    )


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__mro__ }}",
        "{{ raise_exception('no thanks') }}",
        "{% for %}",
        "{{ messages.append(1) }}",
    ],
)
def test_unsafe_or_broken_template_raises(tmp_path, template):
    tok = load_tokenizer(_tiny_bpe(tmp_path, template))
    with pytest.raises(MixtralError, match="chat template"):
        tok.apply_chat_template(_chat(("user", "hi")))


def test_loading_rules_and_errors(tmp_path, v1_path):
    with pytest.raises(MixtralError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(MixtralError, match=r"no tokenizer\.json or tokenizer\.model"):
        load_tokenizer(tmp_path)
    bad_model = tmp_path / "bad" / "tokenizer.model"
    bad_model.parent.mkdir()
    bad_model.write_bytes(b"not a model")
    with pytest.raises(MixtralError, match=r"tokenizer\.model"):
        load_tokenizer(bad_model.parent)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text("{")
    with pytest.raises(MixtralError, match=r"tokenizer\.json"):
        load_tokenizer(bad_json)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(MixtralError, match=r"tokenizer_config\.json"):
        load_tokenizer(tmp_path)

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(v1_path.read_bytes())
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = load_tokenizer(folder)
    assert tok.mistral_v1 and tok.eos_ids == {2, 7}
    (folder / "chat_template.jinja").write_text(MIXTRAL_V1_CHAT_TEMPLATE)
    assert not load_tokenizer(folder).mistral_v1
    (folder / "tokenizer_config.json").write_text(json.dumps({"mixtral_chat_format": "v1"}))
    _tiny_bpe(folder, None, mixtral_chat_format="v1")  # a tokenizer.json too: the v1 format still wins
    tok = load_tokenizer(folder)
    assert tok.mistral_v1 and tok.vocab_size == 32000
    assert load_tokenizer(folder / "tokenizer.json").vocab_size < 1000
