"""Texts -> readings, exactly as the sidecar sees them: tap -> wire -> lens bank.

Used by ``layerwatch baseline build --corpus`` / ``layerwatch score --corpus`` (backtests) and by
the evaluation benchmark. Each text is one request: the real tap (:func:`monitor.attach`) captures
the configured positions (default: the last prompt token) of every state in float16 and publishes
wire-encoded samples to a private in-memory transport; they are decoded with
:func:`monitor.wire.decode` and read by the lens bank. Only the shared stream and the consumer
group of the production sidecar are missing.

``bank`` is anything with the lens bank's interface: ``layers`` (watched states),
``read_arrays(hidden[B, L, d]) -> BankOutput``, ``probe_labels`` and ``bundle_id``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from monitor.drift.features import as_arrays
from monitor.drift.local import local_layers
from monitor.drift.prompt_windows import WindowStates
from monitor.errors import BaselineError
from monitor.lenses.readings import Readings
from monitor.pipeline.stages import LensReader, read
from monitor.windows import DEFAULT_MAX_WINDOWS

LensBankLike = LensReader  # the former name


POSITIONS = ("last", "mean", "last+mean")  # modes with a fixed number of vectors per text


def capture_states(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_tokens: int = 128,
    positions: str = "last+mean",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, tuple[int, ...], str]:
    """Run ``texts`` through ``model`` under the real tap; returns (states, layers, fingerprint).

    ``states`` is float16 [n, L, d] in the order of ``texts`` (the wire payload of each sample: its
    last prompt token for ``positions="last"``, the mean over its prompt tokens for ``"mean"``),
    or [n, L, 2, d] for ``"last+mean"`` (index 0 the mean, 1 the last token); ``layers`` the
    captured state indices.
    """
    states, _, layers, fingerprint = capture_with_windows(
        model, tokenizer, texts, batch_size=batch_size, max_tokens=max_tokens, positions=positions,
        progress=progress, windows=0)
    return states, layers, fingerprint


def capture_with_windows(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_tokens: int = 128,
    positions: str = "last+mean",
    progress: Callable[[int, int], None] | None = None,
    windows: int = DEFAULT_MAX_WINDOWS,
    window_layers: Sequence[int] | None = None,
) -> tuple[np.ndarray, WindowStates | None, tuple[int, ...], str]:
    """:func:`capture_states` plus the prompt windows the tap ships (``windows`` per text at most,
    0 = none): ``(states, window states of window_layers (default: the local score's,
    :func:`monitor.drift.local.local_layers`) or None, layers, fingerprint)``."""
    if positions not in POSITIONS:
        raise BaselineError(f"positions: {positions!r} is not one of {', '.join(POSITIONS)}")
    per = 2 if positions == "last+mean" else 1
    import torch

    import monitor
    from monitor import wire
    from monitor.transport import open_transport

    url = f"memory://offline-{uuid.uuid4().hex[:12]}"
    transport = open_transport(url)
    group = "offline"
    transport.ensure_group(group)
    tap = monitor.attach(model, sample_rate=1.0, transport=transport, positions=positions,
                         queue_max_items=max(256, 2 * batch_size), windows=windows,
                         queue_max_bytes=1 << 34, max_payload_bytes=1 << 30)
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # causal models: real tokens never attend to right padding
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths batch together
    out: np.ndarray | None = None
    parts: list[tuple[np.ndarray, np.ndarray, int] | None] = [None] * len(texts)
    layers: tuple[int, ...] = ()
    fingerprint = ""
    try:
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_tokens)
            rids = [f"text-{int(i)}" for i in idx]
            with torch.no_grad(), tap.batch(rids, force=True):
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
            if not tap.flush(timeout=60.0):
                raise BaselineError("the tap did not publish a batch within 60 s")
            got = 0
            while got < len(idx):
                entries = transport.read(group, "offline", count=len(idx), block_ms=1000)
                if not entries:
                    raise BaselineError(
                        f"the tap published {got} of {len(idx)} samples (dropped: {tap.stats().get('drops')})"
                    )
                for e in entries:
                    s = wire.decode(e.data, max_bytes=1 << 30)
                    i = int(s.request_id.split("-", 1)[1])
                    if out is None:
                        layers = s.layers
                        fingerprint = s.model_fingerprint
                        shape = (len(layers), per, s.hidden_size) if per > 1 else (len(layers), s.hidden_size)
                        out = np.zeros((len(texts), *shape), dtype=np.float16)
                    out[i] = s.hidden[:, -per:, :] if per > 1 else s.hidden[:, -1, :]
                    if s.windows is not None and s.window_bounds is not None:
                        sel = [s.layers.index(x) for x in (window_layers or local_layers(s.layers))]
                        parts[i] = (np.moveaxis(s.windows[sel], 1, 0), s.window_bounds, int(s.prompt_tokens or 0))
                    got += 1
                transport.ack(group, [e.id for e in entries])
            if progress is not None:
                progress(min(start + batch_size, len(texts)), len(texts))
    finally:
        tap.close()
        tap.detach()
        transport.close()
    if out is None:
        raise BaselineError("no texts given")
    win = None
    if windows:
        win = WindowStates.build(tuple(window_layers or local_layers(layers)), parts, out.shape[-1])
    return out, win, layers, fingerprint


def readings_from_states(
    bank: LensBankLike, states: np.ndarray, state_layers: Sequence[int], *, batch_size: int = 16
) -> Readings:
    """Read captured states [n, L, d] (or [n, L, 2, d] of "last+mean": the probes also read the
    mean) with the lens bank, selecting the bank's watched layers, as the sidecar reads them."""
    missing = [x for x in bank.layers if x not in state_layers]
    if missing:
        raise BaselineError(f"the lens bank watches states {missing} that were not captured")
    sel = [list(state_layers).index(x) for x in bank.layers]
    parts = []
    for start in range(0, states.shape[0], batch_size):
        h = np.asarray(states[start:start + batch_size][:, sel], dtype=np.float32)
        last, context = (h[:, :, -1], h[:, :, 0]) if h.ndim == 4 else (h, None)
        parts.append(as_arrays(read(bank, last, context)))
    return Readings.concat(parts)


def readings_and_windows(
    model: Any,
    tokenizer: Any,
    bank: LensBankLike,
    texts: Sequence[str],
    batch_size: int = 16,
    *,
    max_tokens: int = 128,
    positions: str = "last+mean",
    window_layers: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Readings, WindowStates | None]:
    """Readings of ``texts`` and their prompt windows (the local score's input), as the sidecar
    sees them."""
    states, win, layers, _ = capture_with_windows(model, tokenizer, texts, batch_size=batch_size,
                                                  max_tokens=max_tokens, positions=positions, progress=progress,
                                                  window_layers=window_layers)
    return readings_from_states(bank, states, layers, batch_size=batch_size), win


def readings_for_texts(
    model: Any,
    tokenizer: Any,
    bank: LensBankLike,
    texts: Sequence[str],
    batch_size: int = 16,
    *,
    max_tokens: int = 128,
    positions: str = "last+mean",
    progress: Callable[[int, int], None] | None = None,
) -> Readings:
    """Readings of ``texts`` as the sidecar would compute them (tap -> wire -> lens bank)."""
    states, layers, _ = capture_states(model, tokenizer, texts, batch_size=batch_size,
                                       max_tokens=max_tokens, positions=positions, progress=progress)
    return readings_from_states(bank, states, layers, batch_size=batch_size)


def read_corpus(path: str) -> list[str]:
    """Texts of a JSONL corpus (one ``{"text": ...}`` per line; blank lines skipped)."""
    import json

    texts: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                texts.append(str(doc["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise BaselineError(f"{path}:{n}: expected a JSON object with a 'text' field ({exc})") from exc
    return texts


def lens_bank_for(model: Any, bundle: str | None = None) -> LensBankLike:
    """The lens bank for ``model``: the bundle at ``bundle`` (refused if it was made for another
    model), else the PyTorch logit lens over every state."""
    from monitor.adapters import model_fingerprint

    if bundle:
        from monitor.lenses import LensBank  # type: ignore[attr-defined]

        return LensBank.load(bundle, expected_fingerprint=model_fingerprint(model))  # type: ignore[no-any-return]
    from monitor.lenses.torch_lens import TorchLogitLens

    return TorchLogitLens(model)
