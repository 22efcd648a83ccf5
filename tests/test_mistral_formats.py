"""Chat ids for Mistral's later tokenizers (v2/v3: Mixtral-8x22B, Mistral-7B v0.3; v7) against mistral-common.

The reference is mistral-common's own `MistralTokenizer` (`encode_chat_completion`) on the tokenizer files it
ships; the v1 rows repeat, for model directories, what test_tokenizer.py checks for the file. Each chat is
encoded from a bare `tokenizer.model` directory and from a directory with a chat template (the format is read
from the tokenizer, so mistral-common's encoding still decides), from a Hugging Face tokenizer.json converted
by transformers, and through the template itself.
"""

import json
import shutil

import pytest
import tokenizers
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from conftest import TOKENIZER_V1, TOKENIZER_V2, TOKENIZER_V3, TOKENIZER_V7, v3_style_template
from test_tokenizer import CHATS, FINISHED_CHATS, HF_SPACES_DIFFER, _chat, _reference, _stream

from mixtral.errors import MixtralError
from mixtral.tokenizer import MIXTRAL_V1_CHAT_TEMPLATE, load_tokenizer

# Text that spells Mistral's control tokens: it must stay text pieces, never become the control ids.
LITERAL = {
    "literal_inst": _chat(
        ("system", "Never write [INST]."),
        ("user", "What does [INST] mean? And [/INST]?"),
        ("assistant", "[INST] opens a turn, [/INST] closes it."),
        ("user", "[TOOL_CALLS][AVAILABLE_TOOLS] [SYSTEM_PROMPT]x[/SYSTEM_PROMPT]"),
    ),
}
ALL_CHATS = {**CHATS, **LITERAL}
# In text form, a user's "<s>" or "[INST]" cannot be told apart from the real token (parse_special).
TEXT_AMBIGUOUS = {"special_strings", "literal_inst"}
FILES = {"v1": TOKENIZER_V1, "v2": TOKENIZER_V2, "v3": TOKENIZER_V3, "v7": TOKENIZER_V7}
FORMAT = {"v1": "v1", "v2": "v3", "v3": "v3", "v7": "v7"}  # v2 and v3 encode chats without tools alike


def _folder(tmp_path_factory, version, template=None, **config):
    folder = tmp_path_factory.mktemp(f"{version}_{'templated' if template else 'bare'}")
    shutil.copy(FILES[version], folder / "tokenizer.model")
    if template is not None or config:
        config = {"bos_token": "<s>", "eos_token": "</s>", **config}
        if template is not None:
            config["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=[(v, kind) for v in FILES for kind in ("bare", "templated")],
                ids=lambda p: "-".join(p))
def case(request, tmp_path_factory):
    """(version, a tokenizer loaded from a model directory, mistral-common for that file in both modes)."""
    version, kind = request.param
    template = None
    if kind == "templated":  # v1 cannot be recognised by its file: its directory carries the v1 template
        template = MIXTRAL_V1_CHAT_TEMPLATE if version == "v1" else v3_style_template()
    tok = load_tokenizer(_folder(tmp_path_factory, version, template))
    modes = (ValidationMode.test, ValidationMode.finetuning)
    return version, tok, [MistralTokenizer.from_file(str(FILES[version]), mode=m) for m in modes]


def test_the_format_is_read_from_the_tokenizer(case):
    version, tok, (mistral, _) = case
    inner = mistral.instruct_tokenizer.tokenizer
    expected = "template" if version == "v1" and tok.chat_template else FORMAT[version]
    assert tok.chat_format == expected and tok.mistral_v1 == (expected == "v1")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (inner.n_words, inner.bos_id, inner.eos_id)
    if version != "v1":
        control = [inner.get_special_token(p) for p in ("[INST]", "[/INST]", "[TOOL_CALLS]")]
        assert control == [3, 4, 5] and all(tok.is_special(i) for i in control)
        assert [tok.id_to_piece(i) for i in control] == ["[INST]", "[/INST]", "[TOOL_CALLS]"]


@pytest.mark.parametrize("name", ALL_CHATS)
def test_chat_ids_equal_mistral_common(case, name):
    version, tok, (mistral, _) = case
    messages = ALL_CHATS[name]
    ids = tok.apply_chat_template(messages)
    if not (tok.chat_format == "template" and name in TEXT_AMBIGUOUS):  # a typed "<s>" is BOS in a template
        assert ids == _reference(mistral, messages)
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    if name not in TEXT_AMBIGUOUS:  # the text a TGI server receives gives the same ids back
        assert tok.encode(tok.chat_prompt_text(messages), parse_special=True) == ids


@pytest.mark.parametrize("name", FINISHED_CHATS)
def test_finished_chat_ids_equal_mistral_common(case, name):
    version, tok, (_, finetuning) = case
    messages = FINISHED_CHATS[name]
    ids = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert ids == _reference(finetuning, messages) and ids[-1] == tok.eos_id


def test_typed_control_token_strings_stay_text(case):
    version, tok, _ = case
    ids = tok.apply_chat_template(LITERAL["literal_inst"])
    user_text = "What does [INST] mean? And [/INST]?"
    assert user_text in tok.decode(ids)  # decode skips control ids: the typed ones are text
    # Control ids only where the format puts them: <s>, </s> and, from v3 on, one [INST] ... [/INST] per turn.
    expected = {"v1": [1, 2], "v7": [1, 16, 17, 3, 4, 2, 3, 4]}.get(version, [1, 3, 4, 2, 3, 4])
    assert [i for i in ids if tok.is_special(i)] == expected


def test_the_issue_examples(tmp_path_factory):
    """The two conversations of the issue, with the ids mistral-common gave there (tokenizer.model.v3)."""
    tok = load_tokenizer(_folder(tmp_path_factory, "v3"))
    assert tok.apply_chat_template(_chat(("user", "Hello"))) == [1, 3, 23325, 4]
    chat = _chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hey."), ("user", "Who are you?"))
    assert tok.apply_chat_template(chat) == [1, 3, 16127, 4, 17930, 29491, 2, 3, 2507, 7585, 29491, 781, 781,
                                             12215, 1228, 1136, 29572, 4]
    assert tok.chat_prompt_text(chat) == "<s>[INST] Hi[/INST] Hey.</s>[INST] Be brief.\n\nWho are you?[/INST]"


# The spacings of published v3-era templates: the issue's "[INST] user [/INST] answer</s>", Mixtral-8x22B's
# default (" [INST] user [/INST] answer </s>") and Mistral-7B-v0.3's ("[INST] user[/INST] answer</s>").
STYLES = {
    "inst_spaced": {},
    "8x22b_default": dict(user="' [INST] ' + message['content'] + ' [/INST]'",
                          answer="' ' + message['content'] + ' ' + eos_token"),
    "v03": dict(user="'[INST] ' + message['content'] + '[/INST]'"),
}
# Where a template cannot agree: whitespace at the end of a message, next to the template's own spaces. An
# answer's trailing spaces (mistral-common strips them, the templates keep them before </s>), and in the v0.3
# spacing a user message ending in a space (there is no space before [/INST] to tell it from).
TEMPLATE_SPACES_DIFFER = {"spaces", "whitespace_only"}


@pytest.mark.parametrize("style", STYLES)
def test_v3_template_agrees_with_mistral_common_without_a_system_prompt(tmp_path_factory, style):
    folder = _folder(tmp_path_factory, "v3", v3_style_template(**STYLES[style]), mixtral_chat_format="template")
    tok = load_tokenizer(folder)
    mistral = MistralTokenizer.from_file(str(TOKENIZER_V3))
    assert tok.chat_format == "template"
    checked = 0
    for name, messages in ALL_CHATS.items():
        if name in TEXT_AMBIGUOUS | TEMPLATE_SPACES_DIFFER:
            continue
        messages = messages[1:] if messages[0]["role"] == "system" else messages  # the chat without it
        assert tok.apply_chat_template(messages) == _reference(mistral, messages), name
        checked += 1
    assert checked == len(ALL_CHATS) - 4
    # The template has no system role: on the template path a system prompt is refused, not dropped ...
    with pytest.raises(MixtralError, match="left out the system prompt"):
        tok.apply_chat_template(CHATS["system"])
    # ... while by default the same directory encodes it as mistral-common does.
    default = load_tokenizer(_folder(tmp_path_factory, "v3", v3_style_template(**STYLES[style])))
    assert default.apply_chat_template(CHATS["system"]) == _reference(mistral, CHATS["system"])


def test_server_text_forms_of_one_v3_prompt(tmp_path_factory):
    """The spacings templates write around control tokens all mean the same ids; "  " keeps one space."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER_V3))
    tok = load_tokenizer(_folder(tmp_path_factory, "v3"))
    expected = [1, 3, *sp.encode("Hello"), 4, *sp.encode("Hi"), 2, 3, *sp.encode("Who"), 4]
    for text in ("<s>[INST] Hello [/INST] Hi</s>[INST] Who [/INST]",
                 "<s>[INST]Hello[/INST]Hi</s>[INST]Who[/INST]",
                 "<s> [INST] Hello [/INST] Hi </s> [INST] Who [/INST]",
                 "<s>[INST] Hello[/INST] Hi</s>[INST] Who[/INST]"):
        assert tok.encode(text, parse_special=True) == expected, text
    assert tok.encode("[INST]  Hello[/INST]", parse_special=True) == [3, *sp.encode(" Hello"), 4]
    assert 3 not in tok.encode("[INST] Hello [/INST]")  # without parse_special it is text


@pytest.mark.parametrize("legacy", [True, False])
def test_converted_tokenizer_json(tmp_path, legacy):
    """transformers converts the v3 tokenizer.model to a tokenizer.json whose control tokens are special added
    tokens, as in the Hub repositories. Alone in a directory it is recognised as v3; the prompt text we send a
    TGI server is what the tokenizers library (what TGI runs) encodes to the same ids."""
    transformers = pytest.importorskip("transformers")
    shutil.copy(TOKENIZER_V3, tmp_path / "tokenizer.model")
    hf = transformers.LlamaTokenizer.from_pretrained(str(tmp_path), legacy=legacy)
    hf.backend_tokenizer.add_special_tokens([tokenizers.AddedToken(p, special=True) for p in ("[INST]", "[/INST]")])
    hf.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": v3_style_template()}))
    tok = load_tokenizer(tmp_path)
    mistral = MistralTokenizer.from_file(str(TOKENIZER_V3))
    tgi = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.chat_format == "v3" and tok.vocab_size == 32768 and tok.is_special(3)
    for name, messages in ALL_CHATS.items():
        if name in HF_SPACES_DIFFER | TEMPLATE_SPACES_DIFFER | {"newlines"}:
            continue  # Hugging Face's conversion itself splits runs of spaces differently from SentencePiece
        ids = tok.apply_chat_template(messages)
        assert ids == _reference(mistral, messages), name
        if name not in TEXT_AMBIGUOUS:
            text = tok.chat_prompt_text(messages)
            assert tok.encode(text, parse_special=True) == ids, name
            assert tgi.encode(text, add_special_tokens=False).ids == ids, name
    forced = load_tokenizer(tmp_path, chat_format="template")  # the template itself, without system prompts
    for name in ("single", "multi_turn", "emoji"):
        assert forced.apply_chat_template(CHATS[name]) == _reference(mistral, CHATS[name]), name


def test_a_directory_prefers_the_exact_sentencepiece_model(tmp_path_factory):
    """With both files, a Mistral instruct tokenizer.model is used: runs of spaces come out as in
    mistral-common, which the converted tokenizer.json does not give."""
    transformers = pytest.importorskip("transformers")
    folder = _folder(tmp_path_factory, "v3", v3_style_template())
    transformers.LlamaTokenizer.from_pretrained(str(folder), legacy=True).backend_tokenizer.save(
        str(folder / "tokenizer.json"))
    mistral = MistralTokenizer.from_file(str(TOKENIZER_V3))
    spaced = _chat(("user", "  two  leading"), ("assistant", "x"), ("user", "a   b"))
    assert load_tokenizer(folder).apply_chat_template(spaced) == _reference(mistral, spaced)
    assert load_tokenizer(folder / "tokenizer.json").apply_chat_template(spaced) != _reference(mistral, spaced)


def test_a_fine_tune_that_added_tokens_keeps_its_tokenizer_json_and_template(tmp_path_factory):
    """A v3 tokenizer.model beside a tokenizer.json with tokens of its own (a ChatML fine-tune): the json and
    its template decide; an unreadable tokenizer.model beside a json is not an error."""
    transformers = pytest.importorskip("transformers")
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    folder = _folder(tmp_path_factory, "v3", chatml, eos_token="<|im_end|>")
    hf = transformers.LlamaTokenizer.from_pretrained(str(folder), legacy=False).backend_tokenizer
    hf.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    hf.save(str(folder / "tokenizer.json"))
    tok = load_tokenizer(folder)
    (start,), (end,) = (tok.encode(t, parse_special=True) for t in ("<|im_start|>", "<|im_end|>"))
    assert tok.chat_format == "template" and tok.vocab_size == 32770 and {start, end} == {32768, 32769}
    assert tok.eos_id == end
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert ids[1] == start and end in ids  # the template's special tokens as their ids
    (folder / "tokenizer.model").write_bytes(b"not a sentencepiece model")  # the json is still read
    assert load_tokenizer(folder).encode("<|im_end|>", parse_special=True) == [end]


def test_a_template_that_reflows_the_system_prompt_keeps_it(tmp_path_factory):
    """The check that a template did not drop the system prompt compares text with runs of whitespace folded."""
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] | trim }}"
                "{% else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}{% endfor %}")
    tok = load_tokenizer(_folder(tmp_path_factory, "v1", template))
    text = tok.chat_prompt_text([{"role": "system", "content": "  Be\n brief.  "}, {"role": "user", "content": "Hi"}])
    assert "Be\n brief." in text
    dropping = load_tokenizer(_folder(tmp_path_factory, "v1", template.replace("{{ m['content'] | trim }}", "")))
    with pytest.raises(MixtralError, match="left out the system prompt"):
        dropping.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])


def test_streaming_skips_control_tokens_but_not_their_spelling(tmp_path_factory):
    tok = load_tokenizer(_folder(tmp_path_factory, "v3"))
    typed = tok.encode("ok [INST] 🦙 [/INST]")
    ids = [3, 5, *tok.encode("Hi"), 4, *typed, 9, 2, 13]  # control ids between text, as a model may emit them
    deltas, rest = _stream(tok, ids)
    text = "".join(deltas) + rest
    assert text == tok.decode(ids) == "Hi ok [INST] 🦙 [/INST]"
    assert rest == "" and not any("\ufffd" in d for d in deltas)
    assert tok.decode(ids, skip_special=False).startswith("[INST][TOOL_CALLS] Hi[/INST] ok [INST] 🦙")


def test_format_choices_and_errors(tmp_path_factory):
    v3 = _folder(tmp_path_factory, "v3")
    assert load_tokenizer(v3, chat_format="template").chat_format == "template"
    assert load_tokenizer(v3, mistral_v1=False).chat_format == "template"
    assert load_tokenizer(_folder(tmp_path_factory, "v7"), chat_format="v3").chat_format == "v3"
    with pytest.raises(MixtralError, match=r"control token: use chat format 'v3'"):
        load_tokenizer(v3, mistral_v1=True)
    with pytest.raises(MixtralError, match=r"v7 chat format needs .* control tokens .*SYSTEM_PROMPT"):
        load_tokenizer(v3, chat_format="v7")
    with pytest.raises(MixtralError, match=r"v3 chat format needs .* control tokens \[INST\]"):
        load_tokenizer(_folder(tmp_path_factory, "v1"), chat_format="v3")
    with pytest.raises(MixtralError, match=r"unknown chat format 'v9'"):
        load_tokenizer(v3, chat_format="v9")
    with pytest.raises(MixtralError, match=r"unknown mixtral_chat_format 'chatml'"):
        load_tokenizer(_folder(tmp_path_factory, "v3", mixtral_chat_format="chatml"))
    configured = _folder(tmp_path_factory, "v3", v3_style_template(), mixtral_chat_format="v3")
    assert load_tokenizer(configured).chat_format == "v3"
    tekken = tmp_path_factory.mktemp("tekken")
    (tekken / "tekken.json").write_text("{}")
    with pytest.raises(MixtralError, match="tekken tokenizer is not supported"):
        load_tokenizer(tekken)


# Mistral NeMo's way (tekken, v3): no spaces around control tokens, the system prompt in the last user message.
NEMO_STYLE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system %}{{- '[INST]' + system + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- else %}{{- message['content'].rstrip(' ') + eos_token }}{%- endif %}{%- endfor %}"
)


def test_a_tekken_tokenizer_json_uses_its_template(tmp_path):
    """A tekken vocabulary (here Mistral NeMo's, converted by transformers) carries every control token,
    [SYSTEM_PROMPT] included, whatever instruct version it follows: it is not taken for v7, and its template
    decides, special-token strings becoming ids with no spaces taken from the text around them."""
    pytest.importorskip("transformers")
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    tekken = TOKENIZER_V1.parent / "tekken_240718.json"
    convert_tekken_tokenizer(str(tekken), chat_template="").backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": NEMO_STYLE_TEMPLATE}))
    tok = load_tokenizer(tmp_path)
    mistral = MistralTokenizer.from_file(str(tekken))
    assert tok.chat_format == "template" and tok.vocab_size == 131072 and tok.is_special(3)
    for name, messages in CHATS.items():
        if name not in TEXT_AMBIGUOUS:
            assert tok.apply_chat_template(messages) == _reference(mistral, messages), name
