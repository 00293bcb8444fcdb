"""Shared fixtures: tiny random models, the real reference model, Redis helpers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

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
