"""`vllm serve` with EvoPrune, the way a user starts it: an OpenAI-compatible server on loopback answers a chat
request, and its prompt holds the pruned number of visual tokens: Qwen2.5-VL with an image, Qwen3-VL with a video
(an mp4 file, decoded by the server; every frame's block cut alike)."""

import base64
import contextlib
import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from vllm_engine import ENV, VIDEO_SIDE, images, save_tiny_model, videos, visual_blocks

from evoprune_ext import random_models

# The tiny tokenizer has no chat template: "ROLE : content" turns, images and videos as Qwen's vision blocks.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }} : "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% elif part['type'] in ('video', 'video_url') %}<|vision_start|><|video_pad|><|vision_end|> "
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


@contextlib.contextmanager
def serve(tmp_path_factory, builder, architecture: str):
    """A `vllm serve` of a tiny `builder` model with EvoPrune (`architecture`) on a free loopback port: its URL."""
    path = save_tiny_model(tmp_path_factory, builder)
    template = path / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE)
    port = free_port()
    overrides = {"architectures": [architecture], "evoprune": {"keep_ratio": KEEP_RATIO}}
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "vllm"), "serve", str(path), "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", "tiny", "--hf-overrides", json.dumps(overrides), "--chat-template", str(template),
         "--enforce-eager", "--dtype", "bfloat16", "--max-model-len", "2048"],
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


def chat(url: str, part: dict) -> dict:
    """A greedy chat request of 8 tokens: `part` (an image or a video), then a question."""
    return post(f"{url}/v1/chat/completions", {
        "model": "tiny", "max_tokens": 8, "temperature": 0.0, "return_token_ids": True,
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": "what is in this"}]}],
    })


def test_qwen2_5_vl_chat_request_with_an_image(tmp_path_factory):
    (image,) = images(1, seed=0)  # 32 x 32 pixels: 64 merge units
    png = io.BytesIO()
    image.save(png, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    with serve(tmp_path_factory, random_models.qwen2_5_vl, "EvoPruneQwen2_5_VLForConditionalGeneration") as url:
        reply = chat(url, {"type": "image_url", "image_url": {"url": data_url}})
    assert visual_blocks(reply["prompt_token_ids"]) == [("<|image_pad|>", round(64 * KEEP_RATIO))]
    assert reply["usage"]["completion_tokens"] == 8
    assert reply["choices"][0]["message"]["role"] == "assistant"


def test_qwen3_vl_chat_request_with_a_video(tmp_path_factory):
    """4 frames of 32 x 32 pixels at 2 fps, as an mp4: 2 temporal patches of 64 merge units, each its own block
    after a timestamp, each cut to 16."""
    import cv2

    ((frames, metadata),) = videos(1, seed=0)
    file = tmp_path_factory.mktemp("video") / "video.mp4"
    writer = cv2.VideoWriter(str(file), cv2.VideoWriter_fourcc(*"mp4v"), metadata["fps"], VIDEO_SIDE)
    for frame in frames:
        writer.write(np.ascontiguousarray(frame))
    writer.release()
    data_url = "data:video/mp4;base64," + base64.b64encode(file.read_bytes()).decode()
    with serve(tmp_path_factory, random_models.qwen3_vl, "EvoPruneQwen3VLForConditionalGeneration") as url:
        reply = chat(url, {"type": "video_url", "video_url": {"url": data_url}})
    assert visual_blocks(reply["prompt_token_ids"]) == [("<|video_pad|>", round(64 * KEEP_RATIO))] * 2
    assert reply["usage"]["completion_tokens"] == 8
