"""Run vLLM's offline engine in this process with the layerwatch plugin and report what it did.

Used by the vLLM tests as a subprocess (one engine per process: vLLM keeps process-global
state). Input: a JSON spec file; output: ``result.json`` (completions, tap stats) and
``samples.npz`` (each decoded sample's hidden states) in the given folder.

Spec keys: ``env`` (environment set before vLLM is imported), ``engine`` (LLM(...) keyword
arguments), ``batches`` (a list of generate calls, each a list of {"prompt_token_ids": [...],
"force": bool, "max_tokens": int, "n": int}).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", **spec.get("env", {})})
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(**spec["engine"])
    results = []
    for batch in spec["batches"]:
        prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in batch]
        params = [SamplingParams(max_tokens=r.get("max_tokens", 4), temperature=r.get("temperature", 0.0), n=r.get("n", 1), seed=0,
                                 logprobs=r.get("logprobs"),
                                 extra_args={"layerwatch": "force"} if r.get("force") else None) for r in batch]
        outs = llm.generate(prompts, params, use_tqdm=False)
        results.append([{"request_id": o.request_id, "num_cached_tokens": o.num_cached_tokens,
                         "completions": [list(c.token_ids) for c in o.outputs],
                         "logprobs": [[{str(k): v.logprob for k, v in step.items()} for step in (c.logprobs or [])]
                                      for c in o.outputs]} for o in outs])
    from monitor.tap.vllm.frontend import taps

    found = taps()
    doc = {"outputs": results, "taps": len(found)}
    arrays = {}
    if found:
        tap = found[0]
        tap.core.exporter.flush(10)
        doc["stats"] = tap.core.stats()
        doc["fingerprint"] = tap.core.fingerprint
        doc["in_graph"] = tap.in_graph
        transport = tap.settings.transport
        if transport.startswith("memory://"):
            from monitor.transport import open_transport
            from monitor.wire import decode

            got = open_transport(transport).read("t", "c", count=10_000, block_ms=0)
            samples = [decode(e.data) for e in got]
            doc["samples"] = [{"sample_id": s.sample_id, "request_id": s.request_id, "positions": s.positions,
                               "position_index": list(s.position_index), "metadata": s.metadata,
                               "model_fingerprint": s.model_fingerprint, "layers": list(s.layers),
                               "final_topk": None if s.final_topk is None else s.final_topk.ids.tolist(),
                               "window_bounds": None if s.window_bounds is None else s.window_bounds.tolist()}
                              for s in samples]
            arrays = {s.sample_id: np.asarray(s.hidden, dtype=np.float32) for s in samples}
            arrays.update({f"{s.sample_id}.windows": np.asarray(s.windows, dtype=np.float32)
                           for s in samples if s.windows is not None})
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", **arrays)
    (out / "result.json").write_text(json.dumps(doc))


if __name__ == "__main__":
    main()
