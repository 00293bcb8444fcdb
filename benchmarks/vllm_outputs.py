"""Do greedy completions change when the plugin samples requests? (vLLM, default compiled mode)

Where the tap captures inside the compiled graph (the CPU backend) every row of a sampled step
is computed by the same graph as without the plugin; where a sampled step runs uncompiled (CUDA
graphs on, or before the in-graph capture) every row of it goes through eager kernels whose float
rounding may differ from the compiled graph's. This measures which holds. On a
fixed set of prompts (real text of several lengths, 32 greedy tokens each) this runs vLLM's
offline engine twice, in separate processes: without the plugin (``VLLM_PLUGINS=""``) and with
it sampling half of the requests (rate 0.5), and reports, separately for sampled and unsampled
requests, the share of identical completions and the largest difference in the chosen tokens'
log-probabilities up to the first divergence.

    .venv-vllm/bin/python -m benchmarks.vllm_outputs --prompts 200 --out bench-results/vllm_outputs.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def _engine(spec: dict[str, Any]) -> None:
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", **spec["env"]})
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], dtype="float32", kv_cache_memory_bytes=1 << 30, max_model_len=2048, seed=0,
              enforce_eager=spec["eager"])
    outs = llm.generate(spec["prompts"], SamplingParams(max_tokens=32, temperature=0.0, logprobs=1), use_tqdm=False)
    rows = [{"id": o.request_id, "tokens": list(o.outputs[0].token_ids),
             "logprobs": [step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs or [],
                                                              strict=False)]} for o in outs]
    Path(spec["out"]).write_text(json.dumps(rows))


def prompts(n: int) -> list[str]:
    """Real sentences of several lengths (the offline corpora are not needed here: a fixed
    paragraph list cut at different lengths)."""
    base = ("The committee met on Tuesday to discuss the budget for the coming year. Several members "
            "raised concerns about the cost of maintenance, while others argued that the new library "
            "would pay for itself within a decade. After a long debate, the proposal was sent back for "
            "revision. Meanwhile, the weather turned cold and the first snow fell over the hills. ").split()
    return [" ".join(base[i % 7: i % 7 + 4 + (i * 13) % 60]) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/layerwatch/models/SmolLM2-135M-Instruct"))
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--out", default="bench-results/vllm_outputs.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    texts = prompts(args.prompts)
    runs = {}
    for name, env in (("off", {"VLLM_PLUGINS": ""}),
                      ("on", {"LAYERWATCH_TAP_TRANSPORT": "memory://outputs",
                              "LAYERWATCH_TAP_SAMPLE_RATE": str(args.rate)})):
        spec = {"model": args.model, "prompts": texts, "env": env, "eager": args.eager,
                "out": str(out.with_suffix(f".{name}.json"))}
        subprocess.run([sys.executable, "-c", "import json,sys; from benchmarks.vllm_outputs import _engine; "
                        "_engine(json.loads(sys.argv[1]))", json.dumps(spec)], check=True)
        runs[name] = {r["id"]: r for r in json.loads(Path(spec["out"]).read_text())}
    from monitor.tap.sampler import hash_unit

    groups: dict[str, dict[str, Any]] = {"sampled": {"n": 0, "identical": 0, "max_logprob_diff": 0.0},
                                         "unsampled": {"n": 0, "identical": 0, "max_logprob_diff": 0.0}}
    for rid, a in runs["off"].items():
        b = runs["on"][rid]
        g = groups["sampled" if hash_unit(rid) < args.rate else "unsampled"]
        g["n"] += 1
        g["identical"] += a["tokens"] == b["tokens"]
        same = 0
        while same < min(len(a["tokens"]), len(b["tokens"])) and a["tokens"][same] == b["tokens"][same]:
            same += 1
        diffs = [abs(x - y) for x, y in zip(a["logprobs"][: same + 1], b["logprobs"][: same + 1], strict=False)]
        g["max_logprob_diff"] = max(g["max_logprob_diff"], max(diffs, default=0.0))
    doc = {"config": vars(args), "groups": groups}
    out.write_text(json.dumps(doc, indent=1))
    print(f"{'requests':10s} {'n':>5s} {'identical':>10s} {'max |d logprob|':>16s}   ({'eager' if args.eager else 'compiled'})")
    for name, g in groups.items():
        print(f"{name:10s} {g['n']:5d} {g['identical'] / max(1, g['n']):10.3f} {g['max_logprob_diff']:16.2e}")
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
