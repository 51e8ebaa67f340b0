"""`vllm serve` with EvoPrune, the way a user starts it: an OpenAI-compatible server on loopback answers a chat
request with an image, and its prompt holds the pruned number of image tokens."""

import base64
import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from vllm_engine import ENV, images, save_tiny_model

from evoprune_ext import random_models

# The tiny tokenizer has no chat template: "ROLE : content" turns, images as Qwen's vision block.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }} : "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% endfor %}ASSISTANT :"
)
KEEP_RATIO = 0.25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory, random_models.qwen2_5_vl)
    template = path / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE)
    port = free_port()
    overrides = {"architectures": ["EvoPruneQwen2_5_VLForConditionalGeneration"],
                 "evoprune": {"keep_ratio": KEEP_RATIO}}
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "vllm"), "serve", str(path), "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny",
         "--hf-overrides", json.dumps(overrides), "--chat-template", str(template), "--enforce-eager",
         "--dtype", "bfloat16", "--max-model-len", "2048"],
        env=ENV, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"vllm serve did not come up; its log: {log.name}") from None
                time.sleep(2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def test_chat_request_with_an_image(server):
    (image,) = images(1, seed=0)  # 32 x 32 pixels: 64 merge units
    png = io.BytesIO()
    image.save(png, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    reply = post(f"{server}/v1/chat/completions", {
        "model": "tiny", "max_tokens": 8, "temperature": 0.0, "return_token_ids": True,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": "what is in this image"},
        ]}],
    })
    image_pad = random_models.tokenizer().convert_tokens_to_ids("<|image_pad|>")
    assert reply["prompt_token_ids"].count(image_pad) == round(64 * KEEP_RATIO)
    assert reply["usage"]["completion_tokens"] == 8
    assert reply["choices"][0]["message"]["role"] == "assistant"
