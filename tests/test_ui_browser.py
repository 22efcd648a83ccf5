"""The web app in a real browser: Debian's Chromium driven by Playwright (Python) against the app served on a
free loopback port. Chat with streaming, the Experts and Memory tabs, like/dislike, Stop cancelling in the
engine while another tab's reply shares the batch, and the same chat through `mixtral serve` with
`mixtral ui --endpoint` (the real command, in a subprocess) and through the OpenAI client.

Screenshots land in artifacts/ui/. Chromium: `apt-get install chromium` (.ci/run does it); never `playwright
install` (its downloads cannot work here)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mixtral import load
from mixtral.engine import Engine
from mixtral.server import create_app
from mixtral.ui.backends import ChatSettings, LocalBackend, OpenAIBackend

from conftest import serve_in_thread
from test_ui import wait_for

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # gradio's own pandas deprecations
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "ui"
STEP_DELAY = 0.04  # seconds added to every forward pass of the local model, so replies take visible time
# (whatever the kernels: the native ones decode this tiny model in about a millisecond)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not CHROMIUM.is_file():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium; .ci/run does it)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    profile = tmp_path_factory.mktemp("chromium-profile")
    with playwright_api.sync_playwright() as p:  # a persistent context is how Playwright takes --user-data-dir
        context = p.chromium.launch_persistent_context(profile, executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS,
                                                       headless=True, viewport={"width": 1280, "height": 900})
        yield context
        context.close()


@contextlib.contextmanager
def ui_running(backend, feedback_path, defaults=None, models=None):
    """build_app + launch on a free loopback port, without blocking; yield the page URL."""
    from mixtral.ui.app import build_app, launch

    demo = build_app(backend, defaults=defaults, feedback_path=feedback_path, models=models)
    port = free_port()
    launch(demo, "127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def local(tiny_chat_model, tmp_path_factory):
    """The app on the in-process engine (greedy, 400 new tokens by default), its model slowed a little."""
    import time as _time

    model, tokenizer = load(tiny_chat_model, dtype="float32", progress=False)
    model.register_forward_pre_hook(lambda *_: _time.sleep(STEP_DELAY))
    engine = Engine(model, tokenizer, max_batch_size=4, prefix_cache_bytes=64 << 20)
    feedback = tmp_path_factory.mktemp("feedback") / "feedback.jsonl"
    from mixtral.config import load_config

    with ui_running(LocalBackend(engine, tiny_chat_model, "tiny-mixtral"), feedback,
                    ChatSettings(temperature=0.0, max_new_tokens=400),
                    {"tiny-mixtral (loaded)": load_config(tiny_chat_model)}) as url:
        yield url, engine, feedback
    engine.close()


def open_chat(browser, url):
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("textarea[data-testid=textbox]", timeout=60_000)
    return page


def set_max_new_tokens(page, n: int) -> None:
    """Type n into the slider's number box, until the slider itself shows it (a page still hydrating can put the
    default back over a value typed too early)."""
    page.get_by_text("Settings", exact=True).first.click()
    field = page.get_by_label("number input for Max new tokens")
    slider = page.get_by_label("range slider for Max new tokens")
    deadline = time.time() + 30
    while True:
        field.fill(str(n))
        field.press("Tab")
        time.sleep(0.2)
        if slider.input_value() == str(n) and field.input_value() == str(n):
            return
        assert time.time() < deadline, f"the slider shows {slider.input_value()}, not {n}"


def send(page, text: str) -> None:
    box = page.locator("textarea[data-testid=textbox]").first
    box.fill(text)
    box.press("Enter")


def press_stop(page) -> None:
    """Click the Stop button once it shows. gradio's progress overlay of a component that is streaming can lie
    over it for a while (a pointer click then lands on the overlay: seen once in ~10 runs), so the click is
    dispatched to the button itself; the tests then check that the engine really cancelled the request."""
    button = page.locator(".stop-button").first
    button.wait_for(state="visible", timeout=30_000)
    button.dispatch_event("click")


def bot_text(page) -> str:
    return "".join(page.locator("[data-testid=bot]").all_inner_texts())


def watch_reply(page, timeout: float = 60.0) -> list[int]:
    """Wait until the reply has ended (the status line under the chat says how); return the lengths of the
    reply text seen on the way, so a test can tell it streamed in pieces."""
    lengths = []
    deadline = time.time() + timeout
    while "ended by" not in page.locator("#chat-status").inner_text():
        assert time.time() < deadline, f"no finished reply within {timeout} s"
        lengths.append(len(bot_text(page)))
        time.sleep(0.05)
    return lengths


def test_chat_streams_then_experts_and_memory_tabs(browser, local):
    url, engine, feedback = local
    page = open_chat(browser, url)
    assert page.title() == "Mixtral chat"
    set_max_new_tokens(page, 24)
    send(page, "Who goes there?")
    lengths = watch_reply(page)
    reply = bot_text(page)
    assert reply.strip() and len({n for n in lengths if n}) >= 3, lengths  # text arrived in several pieces
    status = page.locator("#chat-status").inner_text()
    assert "24 tokens" in status and "ended by: length" in status, status
    first = re.search(r"(\d+) of (\d+) prompt tokens reused", status)
    assert "first token after" in status and first and first[1] == "0", status  # nothing to reuse yet
    send(page, "And what of the king?")  # the next turn: the conversation so far comes from the prefix cache

    def second_turn():
        found = re.search(r"(\d+) of (\d+) prompt tokens reused", page.locator("#chat-status").inner_text())
        return found if found and int(found[2]) > int(first[2]) else None

    wait_for(second_turn, timeout=60)  # the status line is set when a reply ends
    reused = second_turn()
    assert int(first[2]) <= int(reused[1]) < int(reused[2]), page.locator("#chat-status").inner_text()
    page.screenshot(path=ARTIFACTS / "chat.png", full_page=True)

    page.get_by_role("button", name="Like").last.click()  # recorded to the JSONL file
    wait_for(lambda: feedback.is_file() and feedback.read_text().strip())
    entry = json.loads(feedback.read_text().splitlines()[-1])
    assert entry["liked"] is True and entry["conversation"][0]["content"] == "Who goes there?"

    page.get_by_role("tab", name="Experts").click()
    page.wait_for_selector("#expert-heatmap td.cell", timeout=30_000)
    layers, top_k = engine.model.args.n_layers, engine.model.args.top_k
    cells = page.locator("#expert-heatmap td.cell")
    assert cells.count() % layers == 0 and cells.count() // layers >= 24
    tip = cells.last.get_attribute("title")
    assert "layer" in tip and tip.count("expert ") == top_k, tip
    assert page.locator("#expert-share tr").count() == layers + 1
    page.screenshot(path=ARTIFACTS / "experts.png", full_page=True)

    page.get_by_role("tab", name="Memory").click()
    plan = page.locator("#memory-plan")
    assert "tiny-mixtral" in plan.inner_text()
    page.get_by_label("Model").click()
    page.get_by_role("option", name="Mixtral-8x7B").click()
    wait_for(lambda: "46,702,792,704" in plan.inner_text() and "Does not fit" in plan.inner_text())
    page.screenshot(path=ARTIFACTS / "memory.png", full_page=True)
    page.close()


def test_the_app_refuses_other_hosts_and_other_sites_posts_and_serves_its_own_page(local):
    """DNS rebinding (a foreign Host) gets 421; a POST that another site's page could send without asking (a
    text/plain body, a form upload) gets 403 when the browser says where it came from; the app's own origin, and
    clients that are not browsers, pass (the chat tests above drive the real page through the same guard)."""
    url, _, _ = local
    origin = url.rstrip("/")
    page = httpx.get(url, headers={"Host": "evil.example"}, timeout=30)
    assert page.status_code == 421 and "evil.example" in page.json()["error"]
    assert httpx.get(url, headers={"Host": f"localhost:{origin.rsplit(':', 1)[1]}"}, timeout=30).status_code == 200
    join = f"{origin}/gradio_api/queue/join"
    for headers in ({"Origin": "http://evil.example", "Content-Type": "text/plain"},
                    {"Origin": "null", "Content-Type": "text/plain"},
                    {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"},
                    {"Origin": "http://evil.example", "Content-Type": "application/json"}):
        refused = httpx.post(join, content=b'{"data": ["hi"], "fn_index": 0}', headers=headers, timeout=30)
        assert refused.status_code == 403, headers
    upload = httpx.post(f"{origin}/gradio_api/upload", files={"files": ("a.txt", b"x")},
                        headers={"Origin": "http://evil.example"}, timeout=30)
    assert upload.status_code == 403
    for headers in ({"Origin": origin}, {}):  # its own page; a client that is not a browser
        passed = httpx.post(f"{origin}/gradio_api/upload", files={"files": ("a.txt", b"x")}, headers=headers,
                            timeout=30)
        assert passed.status_code == 200, (headers, passed.text)


def test_stop_cancels_generation_in_the_engine_while_another_tab_shares_the_batch(browser, local):
    url, engine, _ = local
    before = engine.stats()["requests"]
    first, second = open_chat(browser, url), open_chat(browser, url)
    send(first, "Tell me a long story.")
    send(second, "Tell me another long story.")
    wait_for(lambda: engine.stats()["active"] == 2, timeout=60)  # both tabs decode in one batch
    wait_for(lambda: len(bot_text(first)) > 0)
    press_stop(first)
    wait_for(lambda: engine.stats()["requests"]["cancelled"] == before["cancelled"] + 1)
    assert engine.stats()["active"] == 1  # the other tab's reply goes on
    wait_for(lambda: "stopped" in first.locator("#chat-status").inner_text(), timeout=10)
    first.screenshot(path=ARTIFACTS / "stopped.png", full_page=True)
    stopped_reply = bot_text(first)
    assert stopped_reply and "Error" not in stopped_reply
    press_stop(second)
    wait_for(lambda: engine.stats()["active"] == 0 and engine.stats()["waiting"] == 0)
    after = engine.stats()["requests"]
    assert after["cancelled"] == before["cancelled"] + 2 and after["finished"] == before["finished"]
    tokens = engine.stats()["tokens_generated"]
    time.sleep(0.3)
    assert engine.stats()["tokens_generated"] == tokens  # nothing runs any more
    first.close()
    second.close()


@pytest.fixture(scope="module")
def served(tiny_chat_model):
    """`mixtral serve`'s app on a free loopback port."""
    model, tokenizer = load(tiny_chat_model, dtype="float32", progress=False)
    engine = Engine(model, tokenizer, max_batch_size=4)
    with serve_in_thread(create_app(engine, "tiny-mixtral")) as url:
        yield url, engine
    engine.close()


@contextlib.contextmanager
def ui_command(*args: str):
    """`mixtral ui ARGS --port P` as a subprocess; yield the page URL once it answers."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mixtral", "ui", *args, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"mixtral ui exited: {proc.stdout.read()}"
            assert time.time() < deadline, "mixtral ui did not start"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("kind", ["endpoint", "openai"])
def test_same_chat_through_mixtral_serve(browser, served, tiny_chat_model, tmp_path, kind):
    url, engine = served
    finished = engine.stats()["requests"]["finished"]
    feedback = tmp_path / "feedback.jsonl"
    if kind == "endpoint":  # the real command: mixtral ui --endpoint URL (prompt format from --model's tokenizer)
        app = ui_command("--endpoint", url, "--model", str(tiny_chat_model), "--feedback-file", str(feedback))
    else:
        app = ui_running(OpenAIBackend(url + "/v1"), feedback)
    with app as page_url:
        page = open_chat(browser, page_url)
        assert ("TGI endpoint" if kind == "endpoint" else "OpenAI-compatible server") in page.inner_text("#header")
        set_max_new_tokens(page, 12)
        send(page, "Who goes there?")
        watch_reply(page)
        assert bot_text(page).strip()
        assert "ended by: length" in page.locator("#chat-status").inner_text()
        assert engine.stats()["requests"]["finished"] == finished + 1  # the server's engine made the reply
        page.screenshot(path=ARTIFACTS / f"chat-{kind}.png", full_page=True)
        page.get_by_role("tab", name="Experts").click()
        assert "in-process engine" in page.locator("#experts-heatmap").inner_text()
        page.close()
