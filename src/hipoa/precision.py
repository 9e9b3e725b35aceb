"""Which floating-point precision the U-Nets run in, shared by training and prediction.

``choose_policy("auto")`` picks a Keras mixed-precision policy from the hardware:

- a GPU of CUDA compute capability >= 8.0 (Ampere and later): ``mixed_bfloat16``
  (same exponent range as float32, so no loss scaling is needed);
- a GPU of compute capability 7.x (Volta, Turing; the paper's V100): ``mixed_float16``
  (Keras wraps the optimizer in a loss-scale optimizer);
- a CPU whose ``/proc/cpuinfo`` flags include ``amx_bf16`` or ``avx512_bf16``: ``mixed_bfloat16``
  (oneDNN runs bfloat16 matrix products natively there);
- anything else: ``float32``.

Under a mixed policy the layers compute in 16 bits and keep float32 weights; the U-Net's final
softmax stays float32 (see :func:`hipoa.unet.build_unet`). Saved models are always written with a
float32 policy (:func:`with_policy`), so the precision is a run-time choice, not a property of
the ``.keras`` file.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
"""Policies accepted besides ``"auto"``."""

_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags listed in ``cpuinfo`` (empty set when the file is missing)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def _gpu_compute_capabilities() -> list[tuple[int, int]]:
    """Compute capabilities of the GPUs TensorFlow sees (empty without GPUs)."""
    import tensorflow as tf

    caps = []
    for dev in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(dev)
        cc = details.get("compute_capability")
        if cc:
            caps.append((int(cc[0]), int(cc[1])))
    return caps


def choose_policy(precision: str = "auto", *, cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """Resolve a precision setting to a Keras dtype policy name.

    Args:
        precision: ``"auto"`` or one of :data:`POLICIES`.
        cpuinfo: Where to read the CPU flags (a parameter so tests can pass a file).

    Returns:
        One of :data:`POLICIES`.

    Raises:
        ValueError: naming the value when ``precision`` is not recognised.
    """
    if precision in POLICIES:
        return precision
    if precision != "auto":
        raise ValueError(f"precision must be 'auto' or one of {POLICIES}, got {precision!r}")
    caps = _gpu_compute_capabilities()
    if caps:
        cc = min(caps)
        policy = "mixed_bfloat16" if cc >= (8, 0) else "mixed_float16" if cc >= (7, 0) else "float32"
        log.info("precision auto: GPU compute capability %d.%d -> %s", cc[0], cc[1], policy)
        return policy
    flags = cpu_flags(cpuinfo)
    found = [f for f in _CPU_BF16_FLAGS if f in flags]
    policy = "mixed_bfloat16" if found else "float32"
    log.info("precision auto: CPU, bfloat16 flags %s -> %s", found or "none", policy)
    return policy


def set_policy(precision: str = "auto") -> str:
    """Set Keras's global dtype policy; returns the policy name set.

    Prefer passing the policy to :func:`hipoa.unet.build_unet` or :func:`with_policy`; this is for
    code that builds layers itself. Call ``set_policy("float32")`` to restore the default.
    """
    import keras

    policy = choose_policy(precision)
    keras.mixed_precision.set_global_policy(policy)
    return policy


def with_policy(model, policy: str):
    """A copy of a Keras model whose layers compute under ``policy``, with the same weights.

    The input layer keeps its float32 input, and layers whose policy is pinned to ``float32`` in the
    model (the U-Net's output softmax) stay float32, so probabilities are float32 under any policy.

    Args:
        model: A functional ``keras.Model``.
        policy: A dtype policy name, one of :data:`POLICIES` (not ``"auto"``; resolve it first).

    Returns:
        A new ``keras.Model``.
    """
    import keras

    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] == "InputLayer":
            continue
        if layer["config"].get("name") in _pinned_float32(model):
            continue
        layer["config"]["dtype"] = policy
    clone = keras.Model.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


def _pinned_float32(model) -> set[str]:
    """Names of the layers that must stay float32 (marked by ``build_unet``)."""
    return {layer.name for layer in model.layers if layer.name.endswith("_float32")}
