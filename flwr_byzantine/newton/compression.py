"""rho-approximate compressors for COMRADE's uplink (Section 5 and Appendix C of the paper).

A compressor Q is rho-approximate if ||Q(x) - x||^2 <= (1 - rho) ||x||^2 for every x
(Appendix C, Lemma 9 uses this with rho in (0, 1]).  Workers send Q(p_i) instead of p_i.

* :class:`TopK` keeps the k largest-magnitude coordinates: rho = k/d is guaranteed.
* :class:`ScaledSign` sends Q(x) = (||x||_1 / d) sign(x) (Karimireddy et al., "Error Feedback
  Fixes SignSGD", ICML 2019): one bit per coordinate plus one scale.  For this Q,
  ||Q(x) - x||^2 = (1 - ||x||_1^2 / (d ||x||_2^2)) ||x||^2 exactly, so the per-vector rho is
  ||x||_1^2 / (d ||x||_2^2) >= 1/d (the guaranteed value).
* :class:`Identity` is "no compression" (rho = 1).

Every compressor encodes to a dict of numpy arrays (what goes on the wire, so its byte count
is the uplink cost), decodes (with validation: hostile payloads raise ``ValueError``), and
reports both its guaranteed rho and the empirical rho 1 - ||Q(x) - x||^2 / ||x||^2.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

#: dtype of transmitted real values (float64 keeps Newton's fast local convergence visible).
VALUE_DTYPE = np.float64


def empirical_rho(x: np.ndarray, qx: np.ndarray) -> float:
    """1 - ||Q(x) - x||^2 / ||x||^2 (1 when x = 0): the rho this vector actually achieved."""
    x = np.asarray(x, dtype=np.float64)
    nx = float(x @ x)
    if nx == 0.0:
        return 1.0
    diff = np.asarray(qx, dtype=np.float64) - x
    return float(1.0 - float(diff @ diff) / nx)


def payload_nbytes(payload: dict[str, np.ndarray]) -> int:
    """Bytes of the encoded arrays (the uplink cost, headers excluded)."""
    return int(sum(np.asarray(a).nbytes for a in payload.values()))


@dataclass
class Compressed:
    """One compressed vector: wire payload, decoded value and statistics."""

    payload: dict[str, np.ndarray]
    decoded: np.ndarray
    rho: float
    empirical_rho: float

    @property
    def nbytes(self) -> int:
        """Uplink bytes of the payload."""
        return payload_nbytes(self.payload)


class Compressor(ABC):
    """Base class of rho-approximate compressors."""

    #: Registry name (config value).
    name: str = "base"

    @abstractmethod
    def rho(self, d: int) -> float:
        """Guaranteed rho for vectors of dimension ``d``."""

    @abstractmethod
    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Wire payload of Q(x)."""

    @abstractmethod
    def decode(self, payload: dict[str, np.ndarray], d: int) -> np.ndarray:
        """Q(x) from its payload; raises ``ValueError`` on a malformed payload."""

    @abstractmethod
    def expected_nbytes(self, d: int) -> int:
        """Exact payload size for dimension ``d``."""

    def compress(self, x: np.ndarray) -> Compressed:
        """Encode, decode back and measure rho."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        payload = self.encode(x)
        decoded = self.decode(payload, x.size)
        return Compressed(payload=payload, decoded=decoded, rho=self.rho(x.size),
                          empirical_rho=empirical_rho(x, decoded))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Q(x) as a dense vector."""
        return self.compress(x).decoded

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()))
        return f"{type(self).__name__}({params})"


def _array(payload: dict[str, np.ndarray], key: str) -> np.ndarray:
    if key not in payload:
        raise ValueError(f"payload is missing array '{key}' (got {sorted(payload)})")
    return np.asarray(payload[key])


def _floats(a: np.ndarray, key: str) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"array '{key}' has dtype {a.dtype}, expected floating")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"array '{key}' has non-finite values")
    return a


class Identity(Compressor):
    """No compression: Q(x) = x, rho = 1; payload ``{"p": x}`` (float64, 8 d bytes)."""

    name = "none"

    def rho(self, d: int) -> float:
        return 1.0

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"p": np.asarray(x, dtype=VALUE_DTYPE).reshape(-1).copy()}

    def decode(self, payload: dict[str, np.ndarray], d: int) -> np.ndarray:
        if set(payload) != {"p"}:
            raise ValueError(f"expected arrays ['p'], got {sorted(payload)}")
        p = _array(payload, "p")
        if p.shape != (d,):
            raise ValueError(f"array 'p' has shape {p.shape}, expected ({d},)")
        return _floats(p, "p")

    def expected_nbytes(self, d: int) -> int:
        return d * np.dtype(VALUE_DTYPE).itemsize


class TopK(Compressor):
    """Keep the k largest-|x_j| coordinates: Q(x)_j = x_j on them, 0 elsewhere; rho = k/d.

    Give ``k`` (absolute) or ``fraction`` (k = max(1, round(fraction * d))).  Payload:
    ``indices`` (int32, k) and ``values`` (float64, k): 12 k bytes.
    """

    name = "topk"

    def __init__(self, k: int | None = None, fraction: float | None = None) -> None:
        if (k is None) == (fraction is None):
            raise ValueError("give exactly one of k and fraction")
        if k is not None and int(k) < 1:
            raise ValueError("k must be >= 1")
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise ValueError("fraction must be in (0, 1]")
        self.k = None if k is None else int(k)
        self.fraction = None if fraction is None else float(fraction)

    def k_for(self, d: int) -> int:
        """k used for dimension d."""
        if self.k is not None:
            return int(min(self.k, d))
        return int(min(d, max(1, round(self.fraction * d))))

    def rho(self, d: int) -> float:
        return self.k_for(d) / d if d else 1.0

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        k = self.k_for(x.size)
        idx = np.argpartition(-np.abs(x), k - 1)[:k] if k < x.size else np.arange(x.size)
        idx = np.sort(idx)
        return {"indices": idx.astype(np.int32), "values": x[idx].astype(VALUE_DTYPE)}

    def decode(self, payload: dict[str, np.ndarray], d: int) -> np.ndarray:
        if set(payload) != {"indices", "values"}:
            raise ValueError(f"expected arrays ['indices', 'values'], got {sorted(payload)}")
        idx, vals = _array(payload, "indices"), _array(payload, "values")
        k = self.k_for(d)
        if idx.shape != (k,) or vals.shape != (k,):
            raise ValueError(f"top-k payload shapes {idx.shape}, {vals.shape}; expected ({k},)")
        if not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"array 'indices' has dtype {idx.dtype}, expected integer")
        if idx.size and (idx.min() < 0 or idx.max() >= d):
            raise ValueError("top-k indices out of range")
        if np.unique(idx).size != idx.size:
            raise ValueError("top-k indices are not distinct")
        out = np.zeros(d, dtype=np.float64)
        out[idx.astype(np.int64)] = _floats(vals, "values")
        return out

    def expected_nbytes(self, d: int) -> int:
        return self.k_for(d) * (4 + np.dtype(VALUE_DTYPE).itemsize)


class ScaledSign(Compressor):
    """Q(x) = (||x||_1 / d) sign(x) (Karimireddy et al. 2019); guaranteed rho = 1/d.

    Payload: ``signs`` (bit-packed, uint8, ceil(d/8) bytes; bit 1 means x_j >= 0) and
    ``scale`` (float64, 1).  The exact per-vector rho ||x||_1^2 / (d ||x||_2^2) is reported by
    :meth:`vector_rho`.
    """

    name = "sign"

    def rho(self, d: int) -> float:
        return 1.0 / d if d else 1.0

    @staticmethod
    def vector_rho(x: np.ndarray) -> float:
        """||x||_1^2 / (d ||x||_2^2), the exact rho of this Q on x (1 for x = 0)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        n2 = float(x @ x)
        return 1.0 if n2 == 0.0 else float(np.abs(x).sum() ** 2 / (x.size * n2))

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        scale = float(np.abs(x).sum() / x.size) if x.size else 0.0
        return {"signs": np.packbits(x >= 0), "scale": np.array([scale], dtype=VALUE_DTYPE)}

    def decode(self, payload: dict[str, np.ndarray], d: int) -> np.ndarray:
        if set(payload) != {"signs", "scale"}:
            raise ValueError(f"expected arrays ['scale', 'signs'], got {sorted(payload)}")
        bits, scale = _array(payload, "signs"), _array(payload, "scale")
        if bits.dtype != np.uint8 or bits.shape != (math.ceil(d / 8),):
            raise ValueError(f"sign payload {bits.dtype}{bits.shape}; expected uint8({math.ceil(d / 8)},)")
        if scale.shape != (1,):
            raise ValueError(f"array 'scale' has shape {scale.shape}, expected (1,)")
        s = float(_floats(scale, "scale")[0])
        if s < 0:
            raise ValueError("negative sign scale")
        signs = np.unpackbits(bits, count=d).astype(np.float64) * 2.0 - 1.0
        return s * signs

    def expected_nbytes(self, d: int) -> int:
        return math.ceil(d / 8) + np.dtype(VALUE_DTYPE).itemsize


def make_compressor(name: str, topk_fraction: float = 0.1, k: int = 0) -> Compressor:
    """``"none"``, ``"topk"`` (``k`` if > 0, else ``topk_fraction``) or ``"sign"``."""
    if name == "none":
        return Identity()
    if name == "topk":
        return TopK(k=k) if k > 0 else TopK(fraction=topk_fraction)
    if name == "sign":
        return ScaledSign()
    raise ValueError(f"unknown compressor {name!r}; valid: ['none', 'sign', 'topk']")
