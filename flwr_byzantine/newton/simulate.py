"""In-process COMRADE / GIANT driver (no Flower, no Ray) on top of the exact code the Flower
strategies and ClientApp run (:class:`~flwr_byzantine.newton.worker.NewtonWorker` on the
worker side, :func:`~flwr_byzantine.newton.server.newton_step` on the server side).

Every iteration records the communication rounds used so far (COMRADE: 1 per iteration;
GIANT: 2), the uplink/downlink bytes, the kept/trimmed worker indices, the step size and
(if a reference objective / w* is given) loss, accuracy and ||w_t - w*||.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .objectives import GLMObjective
from .server import average_gradients, newton_step
from .worker import NewtonWorker


def _record(t: int, w: np.ndarray, comm: int, up: int, down: int, reference: GLMObjective | None,
            w_star: np.ndarray | None, test: GLMObjective | None, extra: dict[str, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {"iteration": t, "comm_rounds": comm, "bytes_up": up, "bytes_down": down}
    if reference is not None:
        rec["loss"] = reference.value(w)
        rec["grad_norm"] = float(np.linalg.norm(reference.gradient(w)))
    if w_star is not None:
        rec["dist"] = float(np.linalg.norm(w - w_star))
    if test is not None and hasattr(test, "accuracy"):
        rec["test_accuracy"] = test.accuracy(w)
    rec.update(extra)
    return rec


def run_comrade(
    workers: Sequence[NewtonWorker],
    w0: np.ndarray,
    iterations: int,
    beta: float,
    *,
    step_size: float = 1.0,
    server_objective: GLMObjective | None = None,
    reference: GLMObjective | None = None,
    w_star: np.ndarray | None = None,
    test: GLMObjective | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """COMRADE (Algorithm 1): one round per iteration; returns ``(w_T, history)``.

    ``history[0]`` describes w_0; ``history[t]`` the model after iteration t.
    """
    w = np.asarray(w0, dtype=np.float64).copy()
    d = w.size
    up = down = comm = 0
    hist = [_record(0, w, comm, up, down, reference, w_star, test, {})]
    for t in range(1, iterations + 1):
        replies = [wk.direction(w, server_round=t) for wk in workers]
        comm += 1
        down += 8 * d * len(workers)
        up += sum(int(r.metrics["bytes"]) for r in replies)
        res = newton_step(w, np.stack([r.vector for r in replies]), beta, step_size=step_size,
                          server_objective=server_objective)
        w = res.w
        hist.append(_record(t, w, comm, up, down, reference, w_star, test, {
            "kept": res.kept.tolist(), "trimmed": res.trimmed.tolist(), "step": res.step,
            "applied": res.applied, "rho_min": min(float(r.metrics["rho-empirical"]) for r in replies),
        }))
    return w, hist


def run_giant(
    workers: Sequence[NewtonWorker],
    w0: np.ndarray,
    iterations: int,
    beta: float = 0.0,
    *,
    step_size: float = 1.0,
    server_objective: GLMObjective | None = None,
    reference: GLMObjective | None = None,
    w_star: np.ndarray | None = None,
    test: GLMObjective | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """GIANT: two rounds per iteration (exact gradient, then H_i^{-1} g_t); returns ``(w_T, history)``."""
    w = np.asarray(w0, dtype=np.float64).copy()
    d = w.size
    up = down = comm = 0
    hist = [_record(0, w, comm, up, down, reference, w_star, test, {})]
    for t in range(1, iterations + 1):
        grads = [wk.gradient(w, server_round=2 * t - 1) for wk in workers]
        comm += 1
        down += 8 * d * len(workers)
        up += sum(int(r.metrics["bytes"]) for r in grads)
        g_t, _, _ = average_gradients(np.stack([r.vector for r in grads]), beta)
        dirs = [wk.direction(w, g=g_t, server_round=2 * t) for wk in workers]
        comm += 1
        down += 2 * 8 * d * len(workers)  # w_t and g_t
        up += sum(int(r.metrics["bytes"]) for r in dirs)
        res = newton_step(w, np.stack([r.vector for r in dirs]), beta, step_size=step_size,
                          server_objective=server_objective)
        w = res.w
        hist.append(_record(t, w, comm, up, down, reference, w_star, test, {
            "kept": res.kept.tolist(), "trimmed": res.trimmed.tolist(), "step": res.step, "applied": res.applied,
        }))
    return w, hist


def rounds_to_tolerance(history: Sequence[dict[str, Any]], key: str, tol: float) -> int | None:
    """Communication rounds of the first record with ``record[key] <= tol`` (None if never)."""
    for rec in history:
        if key in rec and rec[key] <= tol:
            return int(rec["comm_rounds"])
    return None
