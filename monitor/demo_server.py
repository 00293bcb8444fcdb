"""A small FastAPI inference server with the tap attached: the integration example.

* a middleware takes the request id from ``X-Request-ID`` (or generates one) and returns it;
* each endpoint runs the model inside ``tap.request(request_id, metadata={"route": ...})``,
  so sampling is decided once per HTTP request and replicas agree on it;
* ``/v1/completions`` runs ``model.generate``; ``/v1/batch`` shows batched serving with
  ``tap.batch(request_ids)``; the tap's metrics are mounted at ``/metrics``.

Run standalone: ``python -m monitor.demo_server`` (env ``LAYERWATCH_TAP_*`` configures the tap).
FastAPI is only needed for this module (the ``demo`` extra).
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import torch
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from monitor.tap import Tap


class CompletionRequest(BaseModel):
    prompt: str = Field(..., min_length=1, max_length=20_000)
    max_tokens: int = Field(8, ge=1, le=256)
    force_sample: bool = False


class BatchRequest(BaseModel):
    prompts: list[str] = Field(..., min_length=1, max_length=64)
    request_ids: list[str] | None = None


def create_app(model: Any, tokenizer: Any, tap: Tap, *, max_input_tokens: int = 512) -> FastAPI:
    """The app: the model served with the tap attached."""
    app = FastAPI(title="layerwatch demo inference server")
    lock = threading.Lock()  # one forward at a time: a CPU model gains nothing from concurrency

    @app.middleware("http")
    async def request_id_middleware(request: Request, call_next: Any) -> Response:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = rid
        response: Response = await call_next(request)
        response.headers["X-Request-ID"] = rid
        return response

    def _encode(texts: list[str]) -> dict[str, torch.Tensor]:
        tokenizer.padding_side = "left"  # generation continues from the last column
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return dict(tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_input_tokens))

    @app.post("/v1/completions")
    def completions(body: CompletionRequest, request: Request) -> dict[str, Any]:
        rid = request.state.request_id
        inputs = _encode([body.prompt])
        with lock, tap.request(rid, metadata={"route": "/v1/completions"}, force=body.force_sample) as handle, \
                torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=body.max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return {"request_id": rid, "text": text, "sampled": handle.sampled, "sample_ids": list(handle.sample_ids)}

    @app.post("/v1/batch")
    def batch(body: BatchRequest) -> dict[str, Any]:
        rids = body.request_ids or [uuid.uuid4().hex for _ in body.prompts]
        if len(rids) != len(body.prompts):
            return {"error": "request_ids and prompts differ in length"}
        inputs = _encode(body.prompts)
        with lock, tap.batch(rids, metadata={"route": "/v1/batch"}) as handles, torch.no_grad():
            logits = model(**inputs).logits[:, -1]
        nxt = logits.argmax(-1).tolist()
        return {"results": [{"request_id": h.request_id, "next_token": tokenizer.decode([t]), "sampled": h.sampled}
                            for h, t in zip(handles, nxt, strict=True)]}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(tap.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    return app


def main() -> None:  # pragma: no cover - exercised by the compose stack
    import os

    import uvicorn

    import monitor
    from monitor.refmodel import load_reference_model

    model, tok = load_reference_model()
    tap = monitor.attach(model, model_name="SmolLM2-135M-Instruct")
    uvicorn.run(create_app(model, tok, tap), host="0.0.0.0", port=int(os.environ.get("PORT", "8000")))


if __name__ == "__main__":  # pragma: no cover
    main()
