"""The tap: the only part of layerwatch inside the inference server.

Two front ends over one core: forward hooks on a Hugging Face model (:mod:`monitor.tap.hf`,
``monitor.attach``) and a vLLM plugin (:mod:`monitor.tap.vllm`, loaded by vLLM's plugin
system). Both sample, plan, capture and export through :mod:`monitor.tap.core` and
:mod:`monitor.tap.plan` and ship the same wire format.

This package imports only the standard library, torch, numpy, prometheus_client and the
package's config, errors, metrics, wire format and transports (redis only for a redis URL);
never onnxruntime or anything of the sidecar.
"""

from monitor.tap.hf import RequestHandle, Tap, attach
from monitor.tap.sampler import hash_unit

__all__ = ["Tap", "attach", "RequestHandle", "hash_unit"]
