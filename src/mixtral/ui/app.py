"""The gradio page: Chat, Experts and Memory tabs around one `Backend`.

`build_app(backend, ...)` returns a `gr.Blocks`; `launch(demo, host, port)` serves it (queue on, no analytics,
a plain theme with system fonts, so the page loads nothing from the internet). `generation_defaults(model_dir)`
gives the chat settings a model's generation_config.json asks for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from contextlib import aclosing
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: it never phones home

import gradio as gr  # noqa: E402

from ..config import ModelArgs  # noqa: E402
from ..errors import MixtralError  # noqa: E402
from ..paths import append_line  # noqa: E402
from ..sampling import SamplingParams  # noqa: E402
from . import experts, memory_view  # noqa: E402
from .backends import (  # noqa: E402
    REPETITION_PENALTY_RANGE,
    TEMPERATURE_RANGE,
    TOP_P_RANGE,
    Backend,
    BackendError,
    ChatSettings,
    Turn,
    _text,
    chat_messages,
    clean_settings,
    error_reply,
)

log = logging.getLogger("mixtral.ui")
TITLE = "Mixtral chat"


def status_markdown(turn: Turn, error: str | None = None) -> str:
    """One line about the latest reply (tokens, speed, why it ended) and the notes about adjusted settings."""
    end = turn.ended or time.perf_counter()
    count = f"{len(turn.token_ids)} tokens" if turn.token_ids else f"{turn.chunks} chunks"
    parts = [f"{count} in {end - turn.started:.1f} s"]
    if turn.first_token_at:
        parts.append(f"first token after {turn.first_token_at - turn.started:.2f} s")
    if turn.cached_tokens is not None and turn.prompt_ids:
        parts.append(f"{turn.cached_tokens} of {len(turn.prompt_ids)} prompt tokens reused")
    if turn.first_token_at and len(turn.token_ids) > 1 and end > turn.first_token_at:
        parts.append(f"{(len(turn.token_ids) - 1) / (end - turn.first_token_at):.1f} tokens/s after the first")
    parts.append(f"ended by: {'error' if error else turn.finish_reason or 'unknown'}")
    lines = ["**Latest reply:** " + " · ".join(parts)]
    lines += [f"- note: {note}" for note in turn.notes]
    return "\n".join(lines)


class FeedbackLog:
    """Likes and dislikes appended to a JSONL file, one object per click."""

    def __init__(self, path: Path, backend_label: str):
        self.path, self.backend_label = Path(path), backend_label
        self._lock = threading.Lock()

    def record(self, data: gr.LikeData, history: list) -> None:
        conversation = [{"role": m.get("role"), "content": _text(m.get("content"))}
                        for m in history or [] if isinstance(m, dict)]
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "liked": data.liked,
                 "index": data.index, "message": _text(data.value), "conversation": conversation,
                 "backend": self.backend_label}
        with self._lock:  # one whole line per click, even from many tabs at once, or none on a full disk
            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_line(self.path, json.dumps(entry, ensure_ascii=False))


def _routing_html(backend: Backend, turn: Turn) -> tuple[str, str]:
    try:
        view = experts.expert_view(backend.engine, turn.prompt_ids, turn.token_ids)
    except Exception as exc:  # the view is a bonus: never let it break the chat
        log.warning("expert view failed: %s", exc)
        return experts.unavailable_html(f"The expert view could not be computed: {exc}"), ""
    if view is None:
        return experts.unavailable_html("This model is dense (no experts)."), ""
    return experts.heatmap_html(view), experts.share_html(view)


def make_respond(backend: Backend, defaults: ChatSettings):
    """The chat function: streams the reply; at the end updates the status line and (local engine) the
    Experts tab. Errors become a readable chat message. Stopping closes this generator, which closes the
    backend's stream: the engine request is cancelled (or the HTTP stream to the server closed)."""

    async def respond(message, history, system, temperature, max_new_tokens, top_p, repetition_penalty, seed):
        settings, notes = clean_settings(system, temperature, max_new_tokens, top_p, repetition_penalty, seed,
                                         defaults=defaults, max_new_limit=backend.context)
        turn = Turn(notes=notes)
        text, skip = "", gr.skip()
        try:
            messages = chat_messages(history, message, settings.system)
            async with aclosing(backend.stream(messages, settings, turn)) as stream:
                async for delta in stream:
                    text += delta
                    yield text, skip, skip, skip
        except BackendError as exc:
            yield error_reply(text, str(exc)), status_markdown(turn, str(exc)), skip, skip
            return
        except Exception as exc:  # a bug or an unexpected failure: still a readable message, logged in full
            log.exception("chat failed")
            message = f"{type(exc).__name__}: {exc}"
            yield error_reply(text, message), status_markdown(turn, message), skip, skip
            return
        if backend.engine is not None and turn.prompt_ids:
            heat, share = await asyncio.to_thread(_routing_html, backend, turn)
            yield text, status_markdown(turn), heat, share
        else:
            yield text, status_markdown(turn), skip, skip

    return respond


def generation_defaults(model_dir: str | os.PathLike | None) -> ChatSettings:
    """The chat tab's starting values: the model's generation_config.json where it says, else the page's own
    (`ChatSettings()`), clamped to the page's ranges. A file that cannot be read is ignored, with a warning."""
    defaults = ChatSettings()
    if model_dir is None:
        return defaults
    page = SamplingParams(temperature=defaults.temperature, top_p=defaults.top_p,
                          repetition_penalty=defaults.repetition_penalty, max_new_tokens=defaults.max_new_tokens)
    try:
        params = SamplingParams.from_generation_config(model_dir, page)
    except MixtralError as exc:
        log.warning("%s; the chat starts from mixtral's settings", exc)
        return defaults
    settings, _ = clean_settings(temperature=0.0 if params.greedy else params.temperature, top_p=params.top_p,
                                 repetition_penalty=params.repetition_penalty, max_new_tokens=params.max_new_tokens,
                                 defaults=defaults)
    return settings


def build_app(backend: Backend, *, defaults: ChatSettings | None = None, feedback_path: str | Path,
              models: dict[str, ModelArgs] | None = None, title: str = TITLE) -> gr.Blocks:
    """The whole page. `models`: model configs the Memory tab offers besides the presets (the loaded one)."""
    defaults = defaults or ChatSettings()
    feedback = FeedbackLog(Path(feedback_path), backend.label)
    max_new = backend.context or 4096
    with gr.Blocks(title=title, analytics_enabled=False, fill_height=False) as demo:
        gr.Markdown(f"# {title}\nReplies from **{backend.label}**.", elem_id="header")
        status = gr.Markdown("", elem_id="chat-status", render=False)
        if backend.engine is not None:
            heat = gr.HTML(experts.EMPTY_HTML, elem_id="experts-heatmap", render=False)
        else:
            heat = gr.HTML(experts.unavailable_html(
                "The expert view needs the in-process engine (mixtral ui --model DIR): a remote server does not "
                "report where its router sends tokens."), elem_id="experts-heatmap", render=False)
        share = gr.HTML("", elem_id="experts-share", render=False)
        settings_inputs = [
            gr.Textbox(defaults.system, label="System prompt", lines=2, render=False,
                       info="Placed before the first user message, as Mistral's own library does."),
            gr.Slider(*TEMPERATURE_RANGE, value=defaults.temperature, step=0.05, label="Temperature",
                      info="0 = greedy (always the most likely token)", render=False),
            gr.Slider(1, max_new, value=min(defaults.max_new_tokens, max_new), step=1, label="Max new tokens",
                      render=False),
            gr.Slider(*TOP_P_RANGE, value=defaults.top_p, step=0.01, label="Top-p", render=False),
            gr.Slider(*REPETITION_PENALTY_RANGE, value=defaults.repetition_penalty, step=0.05,
                      label="Repetition penalty", info="1 = off", render=False),
            gr.Number(-1 if defaults.seed is None else defaults.seed, precision=0, label="Seed",
                      info="-1 = a new random seed for every reply", render=False),
        ]
        with gr.Tab("Chat", id="chat"):
            chatbot = gr.Chatbot(elem_id="chatbot", height=460, buttons=["copy", "copy_all"],
                                 feedback_options=("Like", "Dislike"), placeholder="Ask the model something.")
            chat = gr.ChatInterface(make_respond(backend, defaults), chatbot=chatbot, additional_inputs=settings_inputs,
                             additional_inputs_accordion=gr.Accordion("Settings", open=False, render=False),
                             additional_outputs=[status, heat, share], concurrency_limit=None,
                             fill_height=False, autofocus=True)
            status.render()
            chat.textbox.stop(lambda: "**Latest reply:** stopped (generation cancelled)", None, status, queue=False)
            chatbot.like(feedback.record, [chatbot], None)
            gr.Markdown(f"Likes and dislikes are saved to `{feedback.path}`.", elem_id="feedback-note")
        with gr.Tab("Experts", id="experts"):
            gr.Markdown("Where the router sent each token of the latest reply (prompt and reply re-run in one "
                        "forward pass).")
            heat.render()
            share.render()
        with gr.Tab("Memory", id="memory"):
            _memory_tab(models or {})
    return demo


def _memory_tab(loaded: dict[str, ModelArgs]) -> None:
    choices = memory_view.model_choices(loaded)
    first = next(iter(loaded), "Mixtral-8x7B")
    devices = dict(memory_view.DEVICE_SIZES_GB)
    ram = memory_view.machine_ram_gb()
    if ram:
        devices[f"this machine's RAM ({ram:.0f} GB)"] = round(ram)
    device_default = "A100 / H100 (80 GB)"
    with gr.Row():
        model = gr.Dropdown(list(choices), value=first, label="Model")
        precision = gr.Dropdown(memory_view.PRECISIONS, value="bf16", label="Precision")
        context = gr.Number(choices[first].max_seq_len, precision=0, minimum=1, label="Context length (tokens)")
        batch = gr.Number(1, precision=0, minimum=1, label="Sequences at once")
    with gr.Row():
        device = gr.Dropdown(list(devices), value=device_default, label="GPU / RAM")
        memory_gb = gr.Number(devices[device_default], minimum=0, label="Memory (GB)")
    plan = gr.Markdown(memory_view.memory_plan(choices[first], first, "bf16", choices[first].max_seq_len, 1,
                                               devices[device_default]), elem_id="memory-plan")

    def update(name, prec, ctx, n, gb):
        args = choices.get(name) or choices[first]
        return memory_view.memory_plan(args, name, prec, ctx or args.max_seq_len, n or 1, gb or 0)

    inputs = [model, precision, context, batch, memory_gb]
    model.change(lambda name: choices[name].max_seq_len if name in choices else gr.skip(), model, context,
                 queue=False).then(update, inputs, plan, queue=False)
    device.change(lambda d: devices.get(d, gr.skip()), device, memory_gb, queue=False)
    for component in (precision, context, batch, memory_gb):
        component.change(update, inputs, plan, queue=False)


def plain_theme() -> gr.themes.Base:
    """gradio's base theme with system fonts: nothing is fetched from font CDNs."""
    return gr.themes.Base(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
           allowed_hosts: tuple[str, ...] = ()):
    """Serve `demo` (queue on, no analytics, no share link) behind web_guard.WebAppGuard: the Host must name this
    server (IP addresses, localhost, `host` and `allowed_hosts`), and a POST must come from the app's own page.
    block=False returns at once (for tests)."""
    from starlette.middleware import Middleware

    from ..web_guard import WebAppGuard, is_ip

    names = (*allowed_hosts, host) if host not in ("0.0.0.0", "::", "") and not is_ip(host) else allowed_hosts
    demo.queue(default_concurrency_limit=None)
    return demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                       quiet=not block, show_error=False, theme=plain_theme(), footer_links=["gradio", "settings"],
                       ssr_mode=False, mcp_server=False,
                       app_kwargs={"middleware": [Middleware(WebAppGuard, allowed_hosts=names)]})
