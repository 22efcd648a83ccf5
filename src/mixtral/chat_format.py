"""Chat prompts: validating a chat, Mistral's instruct formats built from ids, and Jinja chat templates.

A chat is a list of {"role": "system" | "user" | "assistant", "content": str}: an optional first system
message, then user and assistant turns alternating, starting with user. `Tokenizer.apply_chat_template`
(mixtral.tokenizer) turns it into ids in one of these formats:

* "v1", Mistral's first instruct format (Mixtral-8x7B, Mistral-7B v0.1/v0.2), whose tokenizer has no
  instruct control tokens: `<s>[INST] {system}\\n\\n{user 1} [/INST] {answer 1}</s>[INST] {user 2} [/INST]`,
  where "[INST]" and "[/INST]" are ordinary text. Each "[INST] ... [/INST]" block and each answer is encoded
  as a separate piece of text (so each starts with SentencePiece's dummy-prefix space); the system prompt,
  if non-empty, goes in front of the FIRST user message, separated by a blank line.
* "v3", for tokenizers where "[INST]" and "[/INST]" are control tokens (Mistral's v2 and v3 SentencePiece
  models: Mixtral-8x22B, Mistral-7B v0.3, Codestral; ids 3 and 4 there): `<s>` `[INST]` {user 1} `[/INST]`
  {answer 1} `</s>` `[INST]` {system}\\n\\n{last user} `[/INST]`. Control tokens are single ids; each message's
  text is encoded on its own (dummy-prefix space included); answers lose trailing spaces; the system prompt,
  if non-empty, goes in front of the LAST user message. (v2 and v3 differ only in how tool messages are
  encoded, which chats here do not have.)
* "v7", for tokenizers that also have "[SYSTEM_PROMPT]" and "[/SYSTEM_PROMPT]" control tokens (Mistral's v7
  SentencePiece model): as "v3", but a system message, even an empty one, becomes `[SYSTEM_PROMPT]`
  {system} `[/SYSTEM_PROMPT]` right after `<s>` and no user message carries it.
* "template": the tokenizer's Jinja `chat_template`, rendered in a sandbox.

The three Mistral formats give token for token the ids of mistral-common's `MistralTokenizer` for that
tokenizer version (`encode_chat_completion`), except that an empty answer here is just EOS where
mistral-common refuses it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .errors import MixtralError

CHAT_FORMATS = ("v1", "v3", "v7", "template")

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

ROLES = ("system", "user", "assistant")

# The control tokens each Mistral instruct format needs, by name.
_CONTROL_TOKENS = {
    "v3": ("[INST]", "[/INST]"),
    "v7": ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"),
}


def check_chat(messages: list[dict], add_generation_prompt: bool) -> tuple[str | None, list[dict]]:
    """Validate a chat; return (the system prompt, or None without a system message; the user/assistant turns).

    Raises MixtralError naming the first problem: not a non-empty list, a message that is not a dict with a
    known role and string content, roles out of order, no user message, or (with `add_generation_prompt`) a
    last message that is not the user's.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MixtralError("a chat needs at least one message (a list of {'role': ..., 'content': ...})")
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise MixtralError(
                f"message {n} must be a dict with 'role' in {ROLES} and a string 'content', got {m!r}"
            )
    system, turns, first = None, messages, 0
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
    return system, list(turns)


def mistral_generation(control_id: Callable[[str], int | None]) -> str | None:
    """Which Mistral instruct format a tokenizer's control tokens call for: "v7", "v3", or None.

    `control_id(piece)` returns the id of `piece` if it is a control (special) token of the tokenizer, else
    None. None means no instruct control tokens: a v1 tokenizer, or not one of Mistral's.
    """
    for name in ("v7", "v3"):
        if all(control_id(piece) is not None for piece in _CONTROL_TOKENS[name]):
            return name
    return None


def mistral_chat_ids(
    chat_format: str,
    system: str | None,
    turns: list[dict],
    *,
    encode: Callable[[str], list[int]],
    bos_id: int,
    eos_id: int,
    control_id: Callable[[str], int | None],
) -> list[int]:
    """The ids of a checked chat (`check_chat`'s output) in Mistral format "v1", "v3" or "v7" (module docstring).

    `encode(text)` encodes plain text with the dummy-prefix space and never produces control tokens;
    `control_id` is as for `mistral_generation`. Raises MixtralError if the tokenizer lacks a control token
    that the format needs.
    """
    if chat_format == "v1":
        ids = [bos_id]
        for n, m in enumerate(turns):
            if m["role"] == "user":
                content = f"{system}\n\n{m['content']}" if n == 0 and system else m["content"]
                ids += encode(f"[INST] {content} [/INST]")
            else:
                ids += [*encode(m["content"]), eos_id]
        return ids
    if chat_format not in _CONTROL_TOKENS:
        raise MixtralError(f"unknown Mistral chat format {chat_format!r} (known: v1, v3, v7)")
    controls = {}
    for piece in _CONTROL_TOKENS[chat_format]:
        controls[piece] = control_id(piece)
        if controls[piece] is None:
            raise MixtralError(f"the {chat_format} chat format needs the control token {piece}, which this "
                               "tokenizer does not have")
    ids = [bos_id]
    if chat_format == "v7" and system is not None:
        ids += [controls["[SYSTEM_PROMPT]"], *encode(system), controls["[/SYSTEM_PROMPT]"]]
    last_user = max(n for n, m in enumerate(turns) if m["role"] == "user")
    for n, m in enumerate(turns):
        if m["role"] == "user":
            content = m["content"]
            if chat_format == "v3" and system and n == last_user:
                content = f"{system}\n\n{content}"
            ids += [controls["[INST]"], *encode(content), controls["[/INST]"]]
        else:
            ids += [*encode(m["content"].rstrip(" ")), eos_id]
    return ids


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


def compile_template(source: str):
    """Compile Jinja chat-template source in the sandbox; MixtralError if it does not compile."""
    try:
        return _jinja_env().from_string(source)
    except Exception as e:  # the template is data: a syntax error in it is the user's
        raise MixtralError(f"the chat template failed: {type(e).__name__}: {e}") from e


def render_template(template, messages: list[dict], system: str | None, add_generation_prompt: bool,
                    bos_token: str, eos_token: str) -> str:
    """Render a compiled chat template (`compile_template`) for a checked chat.

    Returns the prompt text with special tokens written out. Raises MixtralError if the template fails
    (sandbox violations and `raise_exception` included) or leaves out a non-empty system prompt, as templates
    without a system role do (Mixtral-8x22B-Instruct's, for one): a dropped instruction is an error, not a
    silent change of meaning.
    """
    try:
        text = template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            raise_exception=_raise_exception,
        )
    except MixtralError:
        raise
    except Exception as e:  # the template is data: any failure in it (sandbox, undefined, ...) is the user's
        raise MixtralError(f"the chat template failed: {type(e).__name__}: {e}") from e
    if system and system.strip() and " ".join(system.split()) not in " ".join(text.split()):
        raise MixtralError(
            "the model's chat template left out the system prompt (it has no system role); remove the "
            "system message, or put the instruction in the first user message"
        )
    return text
