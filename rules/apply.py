"""Applying a conversion rule: pure functions on arrays, and a lookup table over the stored integer range.

A rule's intensity map is one of:

- ``identity``: the reference condition (or no rule).
- ``seed``: the seed's ``d' = a·d + b`` for ``d > c``, ``d' = d`` for ``d ≤ c`` (values at or below ``c`` are
  never changed, claim 2).
- ``piecewise``: a monotone piecewise-linear map through knots ``(x_i, y_i)``, slope 1 beyond the end knots.

For stored integer pixels the map is evaluated once per stored value (rescale included) into a LUT, then
gathered with ``np.take``; the inverse map (for data extension, seed 0143) is exposed where it exists.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

METHODS = ("identity", "seed", "piecewise")


class RuleParameterError(ValueError):
    """Rule parameters that do not define a valid intensity map."""


class NotInvertible(ValueError):
    """The rule's map folds two input ranges onto one output range, so it has no inverse."""


class RuleLike(Protocol):
    """What :func:`apply_rule` reads from a rule (``rules.registry.Rule`` satisfies it)."""

    method: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class IdentityMap:
    """``d' = d``."""

    method = "identity"

    def forward(self, values: np.ndarray) -> np.ndarray:
        """The map on real values (float32 copy)."""
        return np.array(values, dtype=np.float32, copy=True)

    def inverse(self, values: np.ndarray) -> np.ndarray:
        """The inverse map (float32 copy)."""
        return self.forward(values)

    def parameters(self) -> dict[str, Any]:
        """The parameters as stored."""
        return {}


@dataclass(frozen=True)
class SeedMap:
    """The seed's rule: ``d' = a·d + b`` where ``d > c``; ``d' = d`` where ``d ≤ c``."""

    a: float
    b: float
    c: float
    method = "seed"

    def __post_init__(self) -> None:
        if not all(np.isfinite(v) for v in (self.a, self.b, self.c)) or self.a <= 0:
            raise RuleParameterError(f"seed rule needs finite a > 0, b, c; got a={self.a}, b={self.b}, c={self.c}")

    def forward(self, values: np.ndarray) -> np.ndarray:
        """The map on real values (float32)."""
        v = np.asarray(values, dtype=np.float32)
        return np.where(v > np.float32(self.c), v * np.float32(self.a) + np.float32(self.b), v).astype(np.float32)

    @property
    def invertible(self) -> bool:
        """True when the converted range does not overlap the untouched one (``a·c + b ≥ c``)."""
        return self.a * self.c + self.b >= self.c

    def inverse(self, values: np.ndarray) -> np.ndarray:
        """The inverse map; values in the gap ``(c, a·c + b]`` that the rule never produces go to ``c``.

        Raises
        ------
        NotInvertible
            ``a·c + b < c``: two input ranges map onto one.
        """
        if not self.invertible:
            raise NotInvertible(f"seed rule a={self.a:g}, b={self.b:g}, c={self.c:g} folds values (a·c + b < c)")
        v = np.asarray(values, dtype=np.float32)
        top = self.a * self.c + self.b
        back = np.maximum((v - np.float32(self.b)) / np.float32(self.a), np.float32(self.c))
        return np.where(v > np.float32(top), back, np.minimum(v, np.float32(self.c))).astype(np.float32)

    def parameters(self) -> dict[str, Any]:
        """The parameters as stored."""
        return {"a": float(self.a), "b": float(self.b), "c": float(self.c)}


@dataclass(frozen=True)
class PiecewiseMap:
    """A monotone piecewise-linear map through ``(xs[i], ys[i])``, slope 1 beyond the end knots."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]
    method = "piecewise"

    def __post_init__(self) -> None:
        xs, ys = np.asarray(self.xs, float), np.asarray(self.ys, float)
        if xs.ndim != 1 or xs.shape != ys.shape or xs.size < 2:
            raise RuleParameterError("piecewise rule needs at least two knots with as many xs as ys")
        if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
            raise RuleParameterError("piecewise rule knots must be finite")
        if (np.diff(xs) <= 0).any() or (np.diff(ys) < 0).any():
            raise RuleParameterError("piecewise rule knots must increase in x and not decrease in y")

    def _extended(self) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = np.asarray(self.xs, float), np.asarray(self.ys, float)
        far = 1e6
        return (
            np.concatenate(([xs[0] - far], xs, [xs[-1] + far])),
            np.concatenate(([ys[0] - far], ys, [ys[-1] + far])),
        )

    def forward(self, values: np.ndarray) -> np.ndarray:
        """The map on real values (float32)."""
        xs, ys = self._extended()
        v = np.asarray(values, dtype=np.float32)
        return np.interp(v.ravel(), xs, ys).astype(np.float32).reshape(v.shape)

    def inverse(self, values: np.ndarray) -> np.ndarray:
        """The inverse map (flat segments, if any, invert to their left end)."""
        xs, ys = self._extended()
        v = np.asarray(values, dtype=np.float32)
        return np.interp(v.ravel(), ys, xs).astype(np.float32).reshape(v.shape)

    def parameters(self) -> dict[str, Any]:
        """The parameters as stored."""
        return {"xs": [float(x) for x in self.xs], "ys": [float(y) for y in self.ys]}


IntensityMap = IdentityMap | SeedMap | PiecewiseMap


def make_map(method: str, parameters: Mapping[str, Any]) -> IntensityMap:
    """The intensity map of a stored rule.

    Raises
    ------
    RuleParameterError
        Unknown method or parameters that do not define a valid map.
    """
    try:
        if method == "identity":
            return IdentityMap()
        if method == "seed":
            return SeedMap(float(parameters["a"]), float(parameters["b"]), float(parameters["c"]))
        if method == "piecewise":
            return PiecewiseMap(tuple(float(x) for x in parameters["xs"]), tuple(float(y) for y in parameters["ys"]))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, RuleParameterError):
            raise
        raise RuleParameterError(f"{method} rule parameters {dict(parameters)!r} are incomplete: {exc}") from exc
    raise RuleParameterError(f"unknown rule method {method!r} (one of {', '.join(METHODS)})")


def map_of(rule: RuleLike | IntensityMap | None) -> IntensityMap:
    """The intensity map of a rule, a map, or identity for None."""
    if rule is None:
        return IdentityMap()
    if isinstance(rule, IdentityMap | SeedMap | PiecewiseMap):
        return rule
    return make_map(rule.method, rule.parameters)


def apply_rule(rule: RuleLike | IntensityMap | None, values: np.ndarray) -> np.ndarray:
    """Harmonize real-unit values (HU for CT) with a rule: float32, same shape; identity for None.

    Parameters
    ----------
    rule
        A stored rule (``method``, ``parameters``), an intensity map, or None.
    values
        Real-unit values, any shape.

    Returns
    -------
    numpy.ndarray
        float32 harmonized values.
    """
    return map_of(rule).forward(values)


def invert_rule(rule: RuleLike | IntensityMap | None, values: np.ndarray) -> np.ndarray:
    """The inverse conversion (reference look → this condition's look), for data extension (seed 0143).

    Raises
    ------
    NotInvertible
        The rule has no inverse.
    """
    return map_of(rule).inverse(values)


def _lut_index_dtype(dtype: np.dtype) -> tuple[np.dtype, int]:
    """The unsigned view used to index a LUT for stored ``dtype``, and the offset of its value 0."""
    if dtype.kind not in "iu" or dtype.itemsize > 2:
        raise RuleParameterError(f"a lookup table needs 8- or 16-bit integer pixels, not {dtype}")
    unsigned = np.dtype(f"u{dtype.itemsize}")
    return unsigned, (1 << (8 * dtype.itemsize - 1)) if dtype.kind == "i" else 0


@functools.lru_cache(maxsize=64)
def _lut(mapping: IntensityMap, dtype_str: str, slope: float, intercept: float, out_dtype: str) -> np.ndarray:
    dtype = np.dtype(dtype_str)
    unsigned, _ = _lut_index_dtype(dtype)
    stored = np.arange(1 << (8 * dtype.itemsize), dtype=np.int64).astype(unsigned).view(dtype)
    real = mapping.forward(stored.astype(np.float64) * slope + intercept)
    if np.dtype(out_dtype).kind == "f":
        lut = real.astype(out_dtype)
    else:  # back to stored units, rounded and clipped to the stored type
        info = np.iinfo(out_dtype)
        lut = np.clip(np.rint((real.astype(np.float64) - intercept) / slope), info.min, info.max).astype(out_dtype)
    lut.setflags(write=False)
    return lut


def stored_lut(
    rule: RuleLike | IntensityMap | None,
    dtype: np.dtype | str,
    slope: float = 1.0,
    intercept: float = 0.0,
    out_dtype: np.dtype | str = np.float32,
) -> np.ndarray:
    """The lookup table of a rule over every value of a stored 8/16-bit type, indexed by its unsigned view.

    Parameters
    ----------
    rule
        Rule, map or None.
    dtype
        The stored pixel type (``int16``, ``uint16``, ``uint8`` …).
    slope, intercept
        Rescale of the stored values to real units.
    out_dtype
        ``float32`` for real harmonized values, or an integer type for harmonized *stored* values (same rescale).

    Returns
    -------
    numpy.ndarray
        Read-only LUT (cached per rule and rescale).
    """
    return _lut(map_of(rule), np.dtype(dtype).str, float(slope), float(intercept), np.dtype(out_dtype).str)


_CHUNK = 131072  # elements per gather: the intp index buffer stays in cache (≈2.5× a plain np.take here)


def apply_lut(lut: np.ndarray, stored: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Gather ``lut`` at every stored pixel (``np.take`` on the unsigned view, in cache-sized chunks; no float maths).

    Parameters
    ----------
    lut
        From :func:`stored_lut` for this stored type.
    stored
        8/16-bit integer pixels, any shape.
    out
        Optional C-contiguous output of ``stored.shape`` and the LUT's dtype.

    Returns
    -------
    numpy.ndarray
        ``lut[stored]``.
    """
    stored = np.ascontiguousarray(stored)
    unsigned, _ = _lut_index_dtype(stored.dtype)
    if out is None:
        out = np.empty(stored.shape, lut.dtype)
    if not out.flags.c_contiguous or out.shape != stored.shape:
        raise ValueError("out must be C-contiguous with the shape of stored")
    src, dst = stored.view(unsigned).reshape(-1), out.reshape(-1)
    index = np.empty(min(_CHUNK, src.size), np.intp)
    for start in range(0, src.size, _CHUNK):
        part = src[start : start + _CHUNK]
        idx = index[: part.size]
        np.copyto(idx, part, casting="unsafe")
        np.take(lut, idx, out=dst[start : start + _CHUNK], mode="wrap")  # indices are in range by construction
    return out


def apply_rule_stored(
    rule: RuleLike | IntensityMap | None,
    stored: np.ndarray,
    slope: float = 1.0,
    intercept: float = 0.0,
    out_dtype: np.dtype | str = np.float32,
) -> np.ndarray:
    """Harmonize stored integer pixels through a LUT (rescale-aware); other types go through :func:`apply_rule`."""
    stored = np.asarray(stored)
    if stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2:
        return apply_lut(stored_lut(rule, stored.dtype, slope, intercept, out_dtype), stored)
    real = apply_rule(rule, stored.astype(np.float64) * slope + intercept)
    if np.dtype(out_dtype).kind == "f":
        return real.astype(out_dtype)
    return np.rint((real - intercept) / slope).astype(out_dtype)
