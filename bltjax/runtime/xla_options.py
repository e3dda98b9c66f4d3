"""XLA compiler options that bltjax's jitted programs pass per platform (`jax.jit(compiler_options=)`).

Why per program and not ``XLA_FLAGS``: the environment variable is read once, when the backend
starts, and belongs to the user; a program's options travel with it (into the persistent
compilation cache key too) and change nothing else in the process.

CPU: dots through XLA's own (Eigen) kernels, not YNNPACK
---------------------------------------------------------
jax 0.10's XLA:CPU hands every dot to YNNPACK (``xla_cpu_experimental_ynn_fusion_type``
defaults to ``INDIVIDUAL_DOT``), which runs the small batched matmuls inside blockwise attention
far below XLA's own dot emitter; large projections run the same either way. The measurements
are in docs/design.md ("XLA:CPU dots").

Where a later XLA no longer knows the option, compiling with it fails; `compiler_options` then
returns no options (checked once per process with a trivial program).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp

CPU_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _accepted(platform: str, options: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib compiles a trivial program with ``options`` on ``platform``."""
    try:
        device = jax.local_devices(backend=platform)[0]
        probe = jax.jit(jnp.negative, compiler_options=dict(options))
        probe.lower(jax.device_put(jnp.zeros(2, jnp.float32), device)).compile()
    except Exception:  # noqa: BLE001 - an unknown option is an XLA error of no fixed type
        return False
    return True


def compiler_options(devices: Iterable[jax.Device]) -> dict[str, str]:
    """The options for a program that runs on ``devices`` (empty off CPU, or if XLA refuses them)."""
    platforms = {device.platform for device in devices}
    if platforms != {"cpu"}:
        return {}
    options = tuple(sorted(CPU_OPTIONS.items()))
    return dict(options) if _accepted("cpu", options) else {}


def jit(fun, devices: Iterable[jax.Device], **jit_kwargs):
    """`jax.jit` with this module's options for ``devices`` (the devices the program runs on)."""
    return jax.jit(fun, compiler_options=compiler_options(devices) or None, **jit_kwargs)
