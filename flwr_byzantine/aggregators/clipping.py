"""Centered clipping (Karimireddy, He, Jaggi 2021): a *stateful* aggregator.

Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization"
(ICML 2021), Section 4, centered clipping (CC):

    ``v_{l+1} = v_l + (1/R) sum_i (g_i - v_l) min(1, tau / ||g_i - v_l||)``,

started from the previous round's aggregate ``v_0`` (with worker momentum the
inputs move little between rounds, so the previous output is a good centre).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._backend import ArrayLike, is_torch, to_numpy64, weighted_sum
from .base import AggregationResult, Aggregator
from .coordinate import column_chunks, trimmed_window

from .._backend import torch  # the torch module, imported on first use (lean ClientApp processes)


def _like(vec: ArrayLike, updates: ArrayLike) -> ArrayLike:
    """``vec`` converted to the framework, dtype and device of ``updates`` (a copy)."""
    if is_torch(updates):
        if is_torch(vec):
            return vec.detach().to(device=updates.device, dtype=updates.dtype).clone()
        return torch.as_tensor(np.asarray(vec), dtype=updates.dtype, device=updates.device).clone()
    return to_numpy64(vec).astype(updates.dtype)


def _copy(vec: ArrayLike) -> ArrayLike:
    return vec.detach().clone() if is_torch(vec) else np.array(vec, copy=True)


def _norm(vec: ArrayLike) -> float:
    if is_torch(vec):
        return float(torch.linalg.vector_norm(vec.to(torch.float64)))
    return float(np.linalg.norm(np.asarray(vec, dtype=np.float64)))


def row_distances(updates: ArrayLike, centre: ArrayLike) -> np.ndarray:
    """``||g_i - centre||`` for every row: per column chunk in the input dtype, chunks accumulated in float64."""
    R, d = updates.shape
    acc = np.zeros(R)
    for sl in column_chunks(R, d):
        diff = updates[:, sl] - centre[sl]
        if is_torch(diff):
            d64 = diff.to(torch.float64)
            acc += (d64 * d64).sum(dim=1).cpu().numpy()
        else:  # squares summed in the input dtype within a chunk, chunks accumulated in float64
            acc += np.einsum("ij,ij->i", diff, diff)
    return np.sqrt(acc)


class CenteredClipping(Aggregator):
    """Centered clipping, CC (Karimireddy, He, Jaggi, ICML 2021, Section 4).

    Each call runs ``num_iters`` iterations of
    ``v <- v + (1/R) sum_i (g_i - v) min(1, tau / ||g_i - v||)``.

    **State.**  The aggregator remembers a centre across calls: after a call the
    centre becomes ``momentum * centre + (1 - momentum) * output`` (with the
    default ``momentum = 0`` exactly the paper's choice ``v_0 =`` previous round's
    output; ``momentum > 0`` uses an exponential moving average of past outputs
    instead).  The **first call** (or the first after :meth:`reset`, or a call whose
    dimension ``d`` differs from the stored centre's) starts from the
    **coordinate-wise median** of its inputs.  :meth:`reset` forgets the state or
    sets the next starting centre explicitly.  The centre is stored in the
    framework of the last input and converted to the framework, dtype and device
    of the next one.

    Parameters
    ----------
    tau:
        Clipping radius (``float("inf")`` disables clipping: one iteration then
        gives the plain mean).  ``None`` (default) = automatic: at every iteration
        ``tau_l = median_i ||g_i - v_l||``, so at least half of the inputs are
        unclipped and, with fewer than R/2 Byzantine inputs, ``tau_l`` is bounded
        by the distance of an honest input.
    num_iters:
        Number of CC iterations ``L`` per call (the paper uses ``L = 1`` with
        momentum; the default 3 gets closer to the fixed point on a first call).
    momentum:
        In ``[0, 1)``: weight of the old centre in the centre update (see above).

    Diagnostics: the output is ``beta v_0 + sum_i c_i g_i`` exactly; ``weights`` is
    ``c`` and ``info["centre_weight"]`` is ``beta`` (``beta + sum c = 1``);
    ``kept`` are the rows whose clipping factor ``min(1, tau / ||g_i - v||)`` at the
    last iteration is at least 1/2; ``iterations = num_iters``; ``statistic`` is the
    last ``tau``; ``info`` also records ``taus``, ``step_norms``
    (``||v_{l+1} - v_l|| <= tau_l``), the last ``clip_factors`` and which
    ``centre`` was used (``"median"``, ``"previous"`` or ``"given"``).
    """

    name = "cclip"

    def __init__(self, tau: float | None = None, num_iters: int = 3, momentum: float = 0.0) -> None:
        if tau is not None and not (tau > 0):  # also rejects NaN
            raise ValueError(f"tau must be positive (inf allowed) or None for automatic, got {tau!r}")
        if isinstance(num_iters, bool) or int(num_iters) != num_iters or num_iters < 1:
            raise ValueError(f"num_iters must be a positive integer, got {num_iters!r}")
        if not (np.isfinite(momentum) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.tau = None if tau is None else float(tau)
        self.num_iters = int(num_iters)
        self.momentum = float(momentum)
        self._centre: ArrayLike | None = None
        self._centre_given = False

    @property
    def centre(self) -> ArrayLike | None:
        """A copy of the centre the next call starts from (``None``: the median)."""
        return None if self._centre is None else _copy(self._centre)

    def reset(self, centre: ArrayLike | None = None) -> None:
        """Forget the state; the next call starts from ``centre`` (a ``(d,)`` vector) or the median."""
        if centre is not None:
            arr = to_numpy64(centre)
            if arr.ndim != 1 or not np.isfinite(arr).all():
                raise ValueError("centre must be a finite 1-D vector")
            self._centre = _copy(centre)
        else:
            self._centre = None
        self._centre_given = centre is not None

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``({"centre_given": bool}, {"centre": v}`` if a centre is held, else ``{}``)."""
        arrays = {} if self._centre is None else {"centre": to_numpy64(self._centre)}
        return {"centre_given": bool(self._centre_given)}, arrays

    def load_state_dict(self, state: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                        *, dim: int | None = None) -> None:
        """Restore the centre; it must be a finite 1-D vector of length ``dim`` (when given)."""
        unknown = sorted(set(state) - {"centre_given"}) + sorted(set(arrays) - {"centre"})
        if unknown:
            raise ValueError(f"unknown centred-clipping state {unknown}")
        given = state.get("centre_given", False)
        if not isinstance(given, bool):
            raise ValueError(f"centre_given must be a bool, got {given!r}")
        if "centre" not in arrays:
            self._centre, self._centre_given = None, False
            return
        centre = np.asarray(arrays["centre"])
        if centre.ndim != 1 or not np.issubdtype(centre.dtype, np.floating) or not np.isfinite(centre).all():
            raise ValueError(f"clipping centre must be a finite 1-D float vector, got {centre.dtype}{centre.shape}")
        if dim is not None and centre.shape != (dim,):
            raise ValueError(f"clipping centre has {centre.size} entries, the inputs have d={dim}")
        self._centre, self._centre_given = centre.copy(), given

    def _aggregate(self, updates: ArrayLike) -> AggregationResult:
        R, d = updates.shape
        if self._centre is not None and tuple(self._centre.shape) == (d,):
            v0 = _like(self._centre, updates)
            source = "given" if self._centre_given else "previous"
        else:
            v0, _ = trimmed_window(updates, (R - 1) // 2)  # coordinate-wise median
            source = "median"
        v = v0
        coef = np.zeros(R)
        beta = 1.0
        taus: list[float] = []
        steps: list[float] = []
        factors = np.ones(R)
        for _ in range(self.num_iters):
            dist = row_distances(updates, v)
            tau = float(np.median(dist)) if self.tau is None else self.tau
            with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 only where dist <= tau (unused)
                factors = np.where(dist > tau, tau / dist, 1.0)
            a = factors / R
            s = float(a.sum())
            v_new = (1.0 - s) * v + weighted_sum(updates, a)
            coef = (1.0 - s) * coef + a
            beta *= 1.0 - s
            taus.append(tau)
            steps.append(_norm(v_new - v))
            v = v_new
        if self._centre is None or self.momentum == 0.0 or tuple(self._centre.shape) != (d,):
            self._centre = _copy(v)
        else:
            self._centre = self.momentum * _like(self._centre, v) + (1.0 - self.momentum) * v
        self._centre_given = False
        return AggregationResult(
            estimate=v,
            kept=np.flatnonzero(factors >= 0.5),
            weights=coef,
            iterations=self.num_iters,
            statistic=taus[-1],
            info={
                "centre": source,
                "centre_weight": float(beta),
                "taus": taus,
                "step_norms": steps,
                "clip_factors": factors.tolist(),
            },
        )
