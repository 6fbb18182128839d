"""Random streams a Kotlin client reproduces bit for bit: counter-based SplitMix64.

In:  a seed, a stream id (latent, noise, timestep, order) and an index within it.
Out: uint64 values, uniforms in (0, 1), standard normals (Box-Muller, float32), and the sample
     order of an epoch (Fisher-Yates), so a resumed run draws exactly what an uninterrupted one
     would: the order of epoch `e` depends only on (seed, e).
"""

from __future__ import annotations

import functools

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1
STREAM_LATENT, STREAM_NOISE, STREAM_TIMESTEP, STREAM_ORDER = 1, 2, 3, 4


def _mix(z):
    """SplitMix64 finaliser, on python ints or numpy uint64 arrays (arithmetic mod 2^64)."""
    if isinstance(z, np.ndarray):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def stream_key(seed: int, stream: int, index: int) -> int:
    """Key of one random stream: mix(mix(seed + stream*G) + index*G), all mod 2^64."""
    return _mix((_mix((seed + stream * GOLDEN) & MASK) + index * GOLDEN) & MASK)


def random_u64(key: int, count: int) -> np.ndarray:
    """Values j = 0..count-1 of a stream: mix(key + (j+1)*G)."""
    with np.errstate(over="ignore"):
        j = np.arange(1, count + 1, dtype=np.uint64)
        return _mix(np.uint64(key) + j * np.uint64(GOLDEN))


def random_uniform(key: int, count: int) -> np.ndarray:
    """Uniform doubles in (0, 1): ((u >> 11) + 0.5) * 2^-53."""
    return ((random_u64(key, count) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def random_normal(key: int, count: int) -> np.ndarray:
    """Standard normals (Box-Muller on consecutive uniform pairs), as float32."""
    u = random_uniform(key, 2 * ((count + 1) // 2)).reshape(-1, 2)
    r = np.sqrt(-2.0 * np.log(u[:, 0]))
    z = np.stack([r * np.cos(2 * np.pi * u[:, 1]), r * np.sin(2 * np.pi * u[:, 1])], axis=1).reshape(-1)
    return z[:count].astype(np.float32)


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, count: int) -> list[int]:
    """Sample order of one epoch: Fisher-Yates, position i swaps with u_(n-1-i) mod (i+1)."""
    order = list(range(count))
    draws = random_u64(stream_key(seed, STREAM_ORDER, epoch), max(count - 1, 0))
    for step, i in enumerate(range(count - 1, 0, -1)):
        j = int(draws[step] % np.uint64(i + 1))
        order[i], order[j] = order[j], order[i]
    return order
