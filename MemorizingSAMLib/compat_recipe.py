"""Deterministic weights and input volumes of the compatibility fixtures (recipe v1 of shared/compat/SPEC.md).

Lets tests and benchmarks build SAM-Med3D / FastSAM3D-shaped models with reproducible, well-behaved weights
without shipping any: every tensor comes from its state-dict key, its shape and a salt, through CRC32 and
SplitMix64 with integer arithmetic and correctly rounded float64 operations only, so it is bit-exact anywhere.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_SQRT3 = math.sqrt(3.0)
_EMBEDDING_SUFFIXES = (
    "not_a_point_embed.weight",
    "no_mask_embed.weight",
    "iou_token.weight",
    "mask_tokens.weight",
)


def splitmix64(seed: int, n: int) -> np.ndarray:
    """Raw SplitMix64 outputs 1..n from state ``seed`` as uint64 (numpy wraps modulo 2^64 silently)."""
    i = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = np.uint64(seed) + i * _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def unit_stream(seed: int, n: int) -> np.ndarray:
    """u_i = (m - 2^52) / 2^52 with m the top 53 bits: float64 in [-1, 1), exact."""
    m = (splitmix64(seed, n) >> np.uint64(11)).astype(np.int64)
    return (m - (1 << 52)).astype(np.float64) / float(1 << 52)


def _is_point_embedding(key: str) -> bool:
    head, _, tail = key.rpartition("point_embeddings.")
    if not head and not key.startswith("point_embeddings."):
        return False
    num, _, rest = tail.partition(".")
    return num.isdigit() and rest == "weight"


def recipe_tensor(key: str, shape: Sequence[int], salt: str) -> np.ndarray:
    """The float64 value of one state-dict entry under recipe v1 (SPEC.md section 1.3, first matching rule)."""
    n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    u = unit_stream(zlib.crc32((salt + key).encode("ascii")), n)
    if key.endswith("pos_embed"):
        w = 0.5 * u
    elif key.endswith((".rel_pos_d", ".rel_pos_h", ".rel_pos_w")):
        w = 0.25 * u
    elif key.endswith("positional_encoding_gaussian_matrix"):
        w = u * _SQRT3
    elif _is_point_embedding(key) or key.endswith(_EMBEDDING_SUFFIXES):
        w = u * _SQRT3
    elif len(shape) == 1 and key.endswith(".weight"):
        w = 1.0 + 0.1 * u
    elif len(shape) == 1 and key.endswith(".bias"):
        w = 0.05 * u
    else:
        fan_in = n // int(shape[0])
        w = u * math.sqrt(3.0 / fan_in)
    return w.reshape(tuple(shape))


def recipe_state_dict(shapes: Mapping[str, Sequence[int]], salt: str) -> dict[str, np.ndarray]:
    """Every key of ``shapes`` (key -> shape) filled by :func:`recipe_tensor`."""
    return {k: recipe_tensor(k, s, salt) for k, s in shapes.items()}


# Input volume parameters per variant (SPEC.md section 2).
VOLUME_PARAMS = {
    "a": dict(
        cb=(0.5, 0.5, 0.5),
        sb=(0.46, 0.42, 0.40),
        f=(3, 0.25, 2, 4, 0.5),
        blob1=(2.0, (0.32, 0.55, 0.71), (0.12, 0.09, 0.10)),
        blob2=(1.0, (0.30, 0.68, 0.30), (0.08, 0.11, 0.07)),
        p1=(40, 70, 90),
        p2=(88, 30, 61),
    ),
    "b": dict(
        cb=(0.5, 0.48, 0.52),
        sb=(0.44, 0.45, 0.41),
        f=(2, 0.5, 5, 3, 0.25),
        blob1=(2.0, (0.57, 0.35, 0.28), (0.10, 0.13, 0.09)),
        blob2=(1.0, (0.66, 0.64, 0.70), (0.09, 0.07, 0.12)),
        p1=(72, 44, 36),
        p2=(40, 92, 84),
    ),
}


def recipe_volume(variant: str, size: int = 128) -> np.ndarray:
    """The z-normalised input volume V (size^3, float64) indexed (i, j, k) = tensor dims (2, 3, 4)."""
    p = VOLUME_PARAMS[variant]
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    x, y, z = np.meshgrid(c, c, c, indexing="ij")

    def r2(centre, semi):
        return ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2

    two_pi = 2.0 * math.pi
    f1, g1, f2, f3, g3 = p["f"]
    tex = (
        1
        + 0.3 * np.sin(two_pi * (f1 * x + g1 * y)) * np.cos(two_pi * (f2 * y))
        + 0.2 * np.sin(two_pi * (f3 * z + g3 * x))
    )
    a1, c1, s1 = p["blob1"]
    a2, c2, s2 = p["blob2"]
    val = tex + a1 * np.maximum(0, 1 - r2(c1, s1)) ** 2 + a2 * np.maximum(0, 1 - r2(c2, s2)) ** 2
    raw = np.where(r2(p["cb"], p["sb"]) < 1, val, 0.0)
    fg = raw[raw > 0]
    mu = fg.mean()
    sd = math.sqrt(float(((fg - mu) ** 2).sum()) / (fg.size - 1))
    return (raw - mu) / sd
