"""Request bodies of both protocols as pydantic models: types only (strict: "0.5" is not a number, 1.0 is not
an integer, NaN/Infinity are refused). Range rules live in the routes, where they get each protocol's wording.
Unknown keys are ignored, as TGI and OpenAI do, so newer clients keep working.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


# ---- TGI --------------------------------------------------------------------------------------------------

class TGIParameters(_Strict):
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    max_new_tokens: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    do_sample: bool | None = None
    details: bool | None = None
    decoder_input_details: bool | None = None
    return_full_text: bool | None = None
    truncate: int | None = None
    best_of: int | None = None
    top_n_tokens: int | None = None
    watermark: bool | None = None
    grammar: Any = None
    adapter_id: str | None = None


class TGIRequest(_Strict):
    inputs: str
    parameters: TGIParameters | None = None
    stream: bool | None = None


class TokenizeRequest(_Strict):
    inputs: str
    parameters: dict | None = None


# ---- OpenAI -----------------------------------------------------------------------------------------------

class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _OpenAISampling(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: int | None = None
    top_k: int | None = None  # vLLM extras
    min_p: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None
    response_format: dict | None = None


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
