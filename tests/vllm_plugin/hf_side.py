"""The Hugging Face half of the vLLM end-to-end test, run with the main virtualenv's Python.

``bundle OUT``: a verified logit-lens bundle for the real SmolLM2 (identity translators on every
state, with its tokenizer). ``tap URL STREAM SPEC``: the Hugging Face tap (``monitor.attach``)
on the real SmolLM2 publishes one sample per prompt of SPEC (a JSON list of
{"request_id", "prompt"}) to STREAM, as a server using the HF tap would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    import torch

    from monitor.refmodel import load_reference_model

    model, tok = load_reference_model()
    if sys.argv[1] == "bundle":
        from monitor.adapters import find_parts
        from monitor.lenses.model import Translators
        from monitor.lenses.writer import write_bundle

        parts = find_parts(model)
        write_bundle(Path(sys.argv[2]), model, Translators.identity(tuple(range(parts.n_states)), parts.hidden_size),
                     tokenizer=tok, model_name="smollm2")
        return
    import monitor

    url, stream, spec = sys.argv[2], sys.argv[3], json.loads(Path(sys.argv[4]).read_text())
    tap = monitor.attach(model, sample_rate=0.0, transport=url, stream=stream, model_name="smollm2")
    for item in spec:
        with tap.request(item["request_id"], force=True), torch.no_grad():
            model(**tok(item["prompt"], return_tensors="pt"))
    assert tap.flush(30) and tap.stats()["exported"] == len(spec), tap.stats()
    tap.close()


if __name__ == "__main__":
    main()
