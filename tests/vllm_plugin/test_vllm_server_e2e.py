"""End to end through vLLM's OpenAI HTTP server: server + plugin -> Redis -> `layerwatch sidecar`
-> audit records, compared with the Hugging Face tap's records for the same prompts and bundle.

Everything is real: the vLLM OpenAI server (CPU backend, eager) on the real SmolLM2 with the
plugin configured by environment, the real Redis on 127.0.0.1:6379, the `layerwatch sidecar`
process of the main virtualenv with a logit-lens bundle of the same model, the Hugging Face tap
(`monitor.attach`) publishing the same prompts under the same request ids to a second stream
read by a second sidecar. Requests are sampled only because the client asks for it through
`vllm_xargs` (rate 0, request control allowed by the operator).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllm_helpers import real_model_dir

ROOT = Path(__file__).resolve().parents[2]
MAIN_PY = Path(os.environ.get("LAYERWATCH_MAIN_PYTHON", ROOT / ".venv" / "bin" / "python"))
REDIS = "redis://127.0.0.1:6379/0"
PROMPTS = {"q-france": "The capital of France is", "q-code": "def add(a, b):\n    return",
           "q-story": "Once upon a time, in a small village by the sea, there lived an old fisherman who"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode())


def _post(url: str, body: dict[str, Any], rid: str) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json",
                                                                  "X-Request-Id": rid})
    with urllib.request.urlopen(req, timeout=120) as r:
        return dict(json.loads(r.read()))


def _wait(check: Any, timeout: float, what: str, proc: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read()[-3000:] if getattr(proc, "stdout", None) else ""
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n{out}")
        try:
            got = check()
            if got:
                return got
        except Exception:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _records(audit_dir: Path) -> dict[str, dict[str, Any]]:
    from monitor.audit.records import parse_record

    out = {}
    for f in sorted(audit_dir.rglob("*.jsonl")):
        for line in f.read_bytes().splitlines():
            rec = parse_record(line)
            if rec.get("kind") == "sample" and rec.get("request_id") in PROMPTS:
                out[rec["request_id"]] = rec
    return out


def _assert_states_match_hugging_face(stream: str) -> None:
    """The float32 states the server published equal HF's (relative 1e-3; same lens top-1)."""
    import redis
    import torch
    import transformers as tf

    from monitor.adapters import collect_states, find_parts
    from monitor.wire import decode

    tok = tf.AutoTokenizer.from_pretrained(real_model_dir())
    model = tf.AutoModelForCausalLM.from_pretrained(real_model_dir(), dtype=torch.float32).eval()
    entries = redis.Redis.from_url(REDIS).xrange(stream)
    samples = [decode(fields[b"d"]) for _, fields in entries]
    assert sorted(x.request_id for x in samples) == sorted(PROMPTS)
    for x in samples:
        st = collect_states(model, find_parts(model), tok(PROMPTS[x.request_id], return_tensors="pt").input_ids)[:, 0]
        ref = torch.stack([st.mean(1), st[:, -1]], 1)
        got = torch.from_numpy(x.hidden.copy())
        rel = ((got - ref).abs().amax(-1) / ref.abs().amax(-1)).max().item()
        assert rel <= 1e-3, (x.request_id, rel)
        with torch.no_grad():
            lens = lambda h: model.lm_head(model.model.norm(h)).argmax(-1)  # noqa: E731
            assert torch.equal(lens(got), lens(ref)), x.request_id


class Sidecar:
    def __init__(self, stream: str, bundle: Path, tokenizer: Path, workdir: Path) -> None:
        self.port = _port()
        self.audit = workdir / f"audit-{stream.rsplit(':', 1)[-1]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERWATCH")}
        env.update(LAYERWATCH_TRANSPORT=REDIS, LAYERWATCH_STREAM=stream, LAYERWATCH_GROUP="e2e",
                   LAYERWATCH_CONSUMER="e2e-sidecar", LAYERWATCH_BUNDLE=str(bundle),
                   LAYERWATCH_TOKENIZER=str(tokenizer), LAYERWATCH_HTTP_PORT=str(self.port),
                   LAYERWATCH_HTTP_HOST="127.0.0.1", LAYERWATCH_AUDIT__DIRECTORY=str(self.audit),
                   LAYERWATCH_AUDIT__HEAD_KEY_PREFIX=f"{stream}:head:", LAYERWATCH_BASELINE__LEARN_SAMPLES="400",
                   LAYERWATCH_WARM_UP="false", HF_HUB_OFFLINE="1",
                   # the narratives are compared token by token (tokens are off by default)
                   LAYERWATCH_NARRATIVES__INCLUDE_TOKENS="true")
        self.proc = subprocess.Popen([str(MAIN_PY), "-m", "monitor.cli", "sidecar"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def close(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out or ""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-e2e")


@pytest.fixture(scope="module")
def bundle(workdir: Path) -> Path:
    out = workdir / "bundle"
    subprocess.run([str(MAIN_PY), str(Path(__file__).parent / "hf_side.py"), "bundle", str(out)], check=True,
                   timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[dict[str, Any]]:
    """vLLM's OpenAI server with the plugin exporting to a fresh Redis stream."""
    stream = f"layerwatch:e2e:{uuid.uuid4().hex[:8]}"
    port, metrics = _port(), _port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERWATCH")}
    env.update(HF_HUB_OFFLINE="1", LAYERWATCH_TAP_TRANSPORT=REDIS, LAYERWATCH_TAP_STREAM=stream,
               LAYERWATCH_TAP_SAMPLE_RATE="0", LAYERWATCH_TAP_ALLOW_REQUEST_CONTROL="true",
               LAYERWATCH_TAP_MODEL_NAME="smollm2", LAYERWATCH_TAP_METRICS_PORT=str(metrics),
               LAYERWATCH_TAP_WIRE_DTYPE="float32")
    log = open(workdir / "vllm-server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(real_model_dir()),
         "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 30), "--max-model-len", "2048"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: _get(f"http://127.0.0.1:{port}/health") is not None, 300, "vLLM server", proc)
        yield {"base": f"http://127.0.0.1:{port}", "metrics": f"http://127.0.0.1:{metrics}/metrics",
               "stream": stream, "log": workdir / "vllm-server.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        import redis

        redis.Redis.from_url(REDIS).delete(stream)


def test_server_plugin_sidecar_audit_matches_the_hugging_face_tap(server: dict[str, Any], bundle: Path,
                                                                   workdir: Path) -> None:
    """Forced requests through the OpenAI server are audited by `layerwatch sidecar` with the
    same narrative (lens top-1 token at every layer, prediction depth) as the same prompts
    captured by the Hugging Face tap; unforced ones are not sampled; the tap's metrics say so."""
    for rid, prompt in PROMPTS.items():
        body = {"model": "smollm2", "prompt": prompt, "max_tokens": 3, "temperature": 0.0,
                "vllm_xargs": {"layerwatch": "force"}}
        assert _post(server["base"] + "/v1/completions", body, rid)["choices"][0]["text"]
    _post(server["base"] + "/v1/completions", {"model": "smollm2", "prompt": "not sampled", "max_tokens": 2},
          "q-unsampled")
    metrics = _wait(lambda: (m := _get(server["metrics"])) and
                    'layerwatch_tap_samples_exported_total{model="smollm2"} 3.0' in m and m, 60, "tap metrics")
    assert 'layerwatch_tap_requests_skipped_total{model="smollm2",reason="rate"} 1.0' in metrics
    assert 'layerwatch_tap_attached{model="smollm2",reason="ok"} 1.0' in metrics

    _assert_states_match_hugging_face(server["stream"])

    hf_stream = server["stream"] + ":hf"
    spec = workdir / "prompts.json"
    spec.write_text(json.dumps([{"request_id": r, "prompt": p} for r, p in PROMPTS.items()]))
    subprocess.run([str(MAIN_PY), str(Path(__file__).parent / "hf_side.py"), "tap", REDIS, hf_stream, str(spec)],
                   check=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    sidecars = [Sidecar(s, bundle, real_model_dir(), workdir) for s in (server["stream"], hf_stream)]
    try:
        got = [_wait(lambda sc=sc: len(r := _records(sc.audit)) == len(PROMPTS) and r, 240, "audit records",
                     sc.proc) for sc in sidecars]
        processed = [line for line in _get(f"http://127.0.0.1:{sidecars[0].port}/metrics").splitlines()
                     if line.startswith("layerwatch_samples_processed_total{")]
        assert processed and processed[0].endswith(" 3.0"), processed
    finally:
        logs = [sc.close() for sc in sidecars]
        import redis

        redis.Redis.from_url(REDIS).delete(hf_stream)
    vllm_recs, hf_recs = got
    for rid in PROMPTS:
        a, b = vllm_recs[rid]["narrative"], hf_recs[rid]["narrative"]
        top_a = [layer["top"][0][0] for layer in a["layers"]]
        top_b = [layer["top"][0][0] for layer in b["layers"]]
        assert top_a == top_b, (rid, logs)
        assert a.get("prediction_depth") == b.get("prediction_depth")
        assert vllm_recs[rid]["model_fingerprint"] == hf_recs[rid]["model_fingerprint"]
