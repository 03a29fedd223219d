"""The default defence's fast path (input dtype, vectorised row tables) against a float64 reference.

``reference_rounds`` is a plain float64 transcription of the defence as specified in
:mod:`flwr_byzantine.aggregators.defence` (monotonicity evidence per node id with its population
floor, the Byzantine budget on exclusions, the worker momentum with its input clipping and its
far-reply rule, the calibrated RGE filter, centered clipping of the survivors with the trimmed component
along the filter's estimate), written
with dicts and per-node loops.  The implementation must take the same decisions (kept rows,
suspected rows) on random multi-round federations with churn, for float32 and float64 input,
and return the same vector up to the input dtype's rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

from flwr_byzantine.aggregators import RGE, RobustDefence

GAMMA, Z_EXCLUDE, MIN_ROUNDS, GAMMA_SHORT, Z_SHORT = 0.95, 1.5, 5, 0.8, 2.0
SCORE_CLIP, RELATIVE = 3.0, 2.0  # winsorised scores; the relative level median(Z) - 2 MADn(Z) where lower
Q_FLOOR = 0.003  # Z = S / sqrt(Q + 0.003 median Q) over the round's nodes with enough scores
INPUT_CLIP, FAR = 1.0, 4.0  # the momentum's input clipping radius and far-reply distance, in median distances


def reference_rounds(rounds, eps_tilde: float, threshold_factor: float = 1.5, clip_scale: float = 1.0,
                     steps=None, momentum: float = 0.7):
    """Float64 reference of ``RobustDefence(momentum=momentum)`` over ``rounds = [(G, ids), ...]``.

    ``steps[t]`` (optional) is the step reported with ``observe_step`` before round ``t``.
    Returns per round ``(kept, suspected, estimate)``.
    """
    last: dict[int, np.ndarray] = {}
    S: dict[int, float] = {}
    Q: dict[int, float] = {}
    S2: dict[int, float] = {}
    Q2: dict[int, float] = {}
    n: dict[int, int] = {}
    mem: dict[int, np.ndarray] = {}  # worker momentum per node
    mem_seen: dict[int, int] = {}  # the round of its last update
    floor, floor_short = 0.0, 0.0
    last_estimate = None
    rge = RGE(eps_tilde=eps_tilde, threshold_factor=threshold_factor)
    out = []
    for t, (G, ids) in enumerate(rounds):
        G = np.asarray(G, dtype=np.float64)
        step = steps[t] if steps is not None and steps[t] is not None else (
            None if last_estimate is None else -last_estimate)
        if step is not None and np.linalg.norm(step) > 0:
            u = step / np.linalg.norm(step)
            pairs = [(r, node) for r, node in enumerate(ids) if node in last]
            if pairs:
                diffs = np.stack([G[r] - last[node] for r, node in pairs])
                scale = float(np.median(np.linalg.norm(diffs, axis=1)))
                if scale > 0:
                    scores = diffs @ u / scale
                    m = float(np.median(np.abs(scores)))
                    if m > 0:
                        scores = np.clip(scores, -SCORE_CLIP * m, SCORE_CLIP * m)
                    for (_, node), s in zip(pairs, scores):
                        S[node] = GAMMA * S.get(node, 0.0) + s
                        Q[node] = GAMMA * Q.get(node, 0.0) + s * s
                        S2[node] = GAMMA_SHORT * S2.get(node, 0.0) + s
                        Q2[node] = GAMMA_SHORT * Q2.get(node, 0.0) + s * s
                        n[node] = n.get(node, 0) + 1
        last = {node: G[r].copy() for r, node in enumerate(ids)}

        eligible = [node for node in ids if n.get(node, 0) >= MIN_ROUNDS]
        if eligible:
            floor = Q_FLOOR * float(np.median([Q[node] for node in eligible]))
            floor_short = Q_FLOOR * float(np.median([Q2[node] for node in eligible]))

        def z(node, S_, Q_, fl):
            q = Q_.get(node, 0.0) + fl
            return S_.get(node, 0.0) / np.sqrt(q) if q > 0 else 0.0

        level = -Z_EXCLUDE
        if len(eligible) >= 5:
            zs = np.array([z(node, S, Q, floor) for node in eligible])
            med = float(np.median(zs))
            level = min(level, med - RELATIVE * 1.4826 * float(np.median(np.abs(zs - med))))
        suspects = [r for r, node in enumerate(ids) if n.get(node, 0) >= MIN_ROUNDS
                    and (z(node, S, Q, floor) < level or z(node, S2, Q2, floor_short) < -Z_SHORT)]
        budget = int(np.floor(eps_tilde * G.shape[0]))
        if len(suspects) > budget:
            suspects = sorted(sorted(suspects, key=lambda r: z(ids[r], S, Q, floor))[:budget])
        far: list[int] = []
        M = G
        if momentum > 0:
            # what enters the memory is clipped around the last estimate (else the coordinate-wise median);
            # a reply beyond FAR median distances is left out, the farthest first, within the budget left
            centre0 = last_estimate if last_estimate is not None else np.median(G, axis=0)
            dist0 = np.linalg.norm(G - centre0, axis=1)
            med0 = float(np.median(dist0))
            if med0 > 0:
                cand = [r for r in range(G.shape[0]) if dist0[r] > FAR * med0 and r not in suspects]
                far = sorted(sorted(cand, key=lambda r: -dist0[r])[: max(budget - len(suspects), 0)])
                clipped = centre0 + np.minimum(1.0, INPUT_CLIP * med0 / np.maximum(dist0, 1e-300))[:, None] * (G - centre0)
            else:
                clipped = G
            M = np.zeros_like(G)
            for r, node in enumerate(ids):
                if r in far:  # left out of the round: enters no memory, which is held as it was
                    if node in mem:
                        mem_seen[node] = t
                    continue
                cont = node in mem and mem_seen[node] == t - 1
                mem[node] = momentum * mem[node] + (1 - momentum) * clipped[r] if cont else clipped[r].copy()
                mem_seen[node] = t
                M[r] = mem[node]
        active = np.array([r for r in range(G.shape[0]) if r not in suspects and r not in far])
        Y = M[active]
        if budget > 0 and len(suspects) + len(far) >= budget:  # the budget is spent before the filter: the plain mean
            kept, centre, surv = active, Y.mean(axis=0), Y
        else:
            res = rge.aggregate(Y)
            kept = active[res.kept]
            centre = np.asarray(res.estimate, dtype=np.float64)
            surv = Y[res.kept]
        estimate = centre
        if budget > 0 and G.shape[0] - kept.size >= budget:
            pass  # the Byzantine budget is spent on this round's exclusions: the survivors' plain mean
        elif kept.size > 1:
            dist = np.linalg.norm(surv - centre, axis=1)
            radius = clip_scale * float(np.median(dist))
            if radius > 0:
                f = np.minimum(1.0, radius / np.maximum(dist, 1e-300))
                estimate = centre + (f[:, None] * (surv - centre)).mean(axis=0)
                # along the centre's direction: the trimmed mean of the survivors' components, trimming the budget
                # the round has not spent from each side, where it is above the clipped estimate's component
                trim, cn = max(budget - (G.shape[0] - kept.size), 0), float(np.linalg.norm(centre))
                if trim > 0 and kept.size > 2 * trim and cn > 0:
                    u = centre / cn
                    p = np.sort((surv - centre) @ u)
                    raise_by = float(np.mean(p[trim:kept.size - trim])) - (estimate - centre) @ u
                    estimate = estimate + max(raise_by, 0.0) * u
        last_estimate = estimate
        out.append((kept, suspects, estimate))
    return out


def _federation(seed: int, R: int, d: int, T: int, dtype, churn: bool):
    """``T`` rounds of noisy gradients of heterogeneous convex quadratics along a fixed trajectory;
    two sign flippers, one far outlier; with ``churn`` nodes leave, return and join, in shuffled order."""
    rng = np.random.default_rng(seed)
    nodes = [1000 + 17 * i for i in range(R + 4)]
    curv = rng.uniform(0.5, 3.0, size=(len(nodes), d))
    b = rng.normal(size=(len(nodes), d)) * rng.uniform(0.5, 3.0, size=(len(nodes), 1))
    flip, far = set(nodes[:2]), nodes[2]
    x = rng.normal(size=d)
    rounds, steps = [], []
    for _ in range(T):
        ids = list(nodes[:R])
        if churn:
            present = rng.permutation(len(nodes))[: R - int(rng.integers(0, 3))]
            ids = [nodes[i] for i in sorted(present, key=lambda i: rng.random())]
        rows = []
        for node in ids:
            i = nodes.index(node)
            g = curv[i] * x - b[i] + 0.3 * rng.normal(size=d)
            if node in flip:
                g = -g
            if node == far:
                g = g + 50.0 * np.sqrt(d) * rng.normal(size=d) / np.sqrt(d)
            rows.append(g)
        G = np.stack(rows).astype(dtype)
        rounds.append((G, ids))
        step = -0.05 * np.mean(rows, axis=0)
        steps.append(step)
        x = x + step
    return rounds, steps


@pytest.mark.parametrize("momentum", [0.7, 0.0])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("seed", range(6))
def test_defence_takes_the_reference_decisions(seed, dtype, momentum):
    R, d = [(12, 9), (20, 40), (16, 150), (25, 64), (10, 300), (30, 20)][seed]
    churn = seed % 2 == 1
    rounds, steps = _federation(seed, R, d, 18, dtype, churn)
    use_steps = seed % 3 == 0
    ref = reference_rounds(rounds, 0.25, steps=[None] + steps[:-1] if use_steps else None, momentum=momentum)
    # the transcription covers evidence, budget, memory, filter and clipping: the other components off
    kw = {} if momentum == 0.7 else {"momentum": momentum}  # 0.7: the default
    rule = RobustDefence(eps_tilde=0.25, self_clip_scale=None, jump_factor=None, gross_factor=None, mixing=False, **kw)
    suspected_any = far_any = 0
    for t, ((G, ids), (kept, suspects, estimate)) in enumerate(zip(rounds, ref)):
        if use_steps and t > 0:
            rule.observe_step(steps[t - 1])
        res = rule.aggregate(G, client_ids=ids)
        assert res.estimate.dtype == dtype
        assert sorted(res.info["suspected"]) == sorted(suspects), f"round {t}"
        assert sorted(res.kept.tolist()) == sorted(kept.tolist()), f"round {t}"
        tol = (1e-5 if dtype == np.float32 else 1e-10) * (np.linalg.norm(estimate) + np.abs(G).max())
        assert np.linalg.norm(res.estimate - estimate) <= tol, f"round {t}"
        suspected_any += bool(suspects)
        far_any += bool(res.info["gross"])  # the gross screen is off: these are the far replies
    assert suspected_any >= 3  # the evidence did exclude someone: the comparison covered that path
    assert (far_any >= 1) == (momentum > 0)  # and, with the memory, the far-reply rule


def test_defence_with_momentum_takes_the_same_decisions_in_float32_and_float64():
    rounds, _ = _federation(11, 16, 50, 14, np.float64, churn=True)
    a, b = RobustDefence(eps_tilde=0.25, momentum=0.9), RobustDefence(eps_tilde=0.25, momentum=0.9)
    for t, (G, ids) in enumerate(rounds):
        ra, rb = a.aggregate(G, client_ids=ids), b.aggregate(G.astype(np.float32), client_ids=ids)
        assert rb.estimate.dtype == np.float32
        assert ra.kept.tolist() == rb.kept.tolist() and ra.info["suspected"] == rb.info["suspected"], f"round {t}"
        assert ra.info["gross"] == rb.info["gross"], f"round {t}"
        assert np.linalg.norm(ra.estimate - rb.estimate) <= 1e-5 * (np.linalg.norm(ra.estimate) + np.abs(G).max())


@pytest.mark.parametrize("churn", [False, True])
def test_full_default_defence_takes_the_same_decisions_in_float32_and_float64(churn):
    """Self-reference clipping, jumps and the gross screen included (the default), with churn."""
    rounds, steps = _federation(12 + churn, 20, 60, 16, np.float64, churn=churn)
    a, b = RobustDefence(eps_tilde=0.25), RobustDefence(eps_tilde=0.25)
    clipped = 0
    for t, (G, ids) in enumerate(rounds):
        ra, rb = a.aggregate(G, client_ids=ids), b.aggregate(G.astype(np.float32), client_ids=ids)
        assert rb.estimate.dtype == np.float32
        for key in ("suspected", "gross", "jumped"):
            assert ra.info.get(key) == rb.info.get(key), f"round {t}: {key}"
        assert ra.kept.tolist() == rb.kept.tolist(), f"round {t}"
        assert np.linalg.norm(ra.estimate - rb.estimate) <= 1e-5 * (np.linalg.norm(ra.estimate) + np.abs(G).max())
        clipped += ra.info.get("self_clipped", 0)
    assert clipped > 0 and a.state_dict()[1]["self_reference.refs"].dtype == np.float64
    assert b.state_dict()[1]["self_reference.refs"].dtype == np.float32  # the tables keep the input dtype


def test_memory_tables_keep_the_input_dtype_and_reuse_rows():
    from flwr_byzantine.aggregators.memory import MonotonicityEvidence

    rng = np.random.default_rng(0)
    ev = MonotonicityEvidence()
    ev.observe(rng.normal(size=(4, 8)).astype(np.float32), [1, 2, 3, 4], None)
    table = ev._last
    assert table.rows.dtype == np.float32 and table.rows.shape[0] == 4
    G = rng.normal(size=(4, 8)).astype(np.float32)
    ev.observe(G, [5, 2, 3, 4], rng.normal(size=8))  # node 1 left, node 5 takes its row
    assert table.rows.shape[0] == 4 and table.index[5] == 0
    np.testing.assert_array_equal(table.get([5, 2, 3, 4]), G)
    ev.observe(G.astype(np.float64), [5, 2, 3, 4], rng.normal(size=8))  # a wider round widens the table
    assert table.rows.dtype == np.float64


def test_large_rounds_run_the_sketched_fast_filter():
    rng = np.random.default_rng(1)
    R, d = 24, 8200
    G = rng.standard_normal((R, d), dtype=np.float32)
    G[:4] += np.float32(2.0)  # a far cluster of 4
    ids = list(range(R))
    fast = RobustDefence(eps_tilde=0.2, fast_above=R * d, seed=0).aggregate(G, client_ids=ids)
    assert fast.info["sketch_dim"] == 2048 and set(fast.dropped.tolist()) == {0, 1, 2, 3}
    exact = RobustDefence(eps_tilde=0.2, fast_above=None).aggregate(G, client_ids=ids)
    assert exact.info.get("sketch_dim") is None and set(exact.dropped.tolist()) == {0, 1, 2, 3}
    small = RobustDefence(eps_tilde=0.2, fast_above=R * d + 1).aggregate(G, client_ids=ids)
    assert small.info.get("sketch_dim") is None
    with pytest.raises(ValueError):
        RobustDefence(fast_above=0)


@pytest.mark.parametrize("sketch_dim", [None, 512])
def test_rge_aggregate_rows_equals_aggregate_of_the_subset(sketch_dim):
    rng = np.random.default_rng(2)
    G = rng.standard_normal((30, 5000), dtype=np.float32)
    G[[3, 7, 11]] += np.float32(3.0)  # three far rows the filter removes
    rows = np.setdiff1d(np.arange(30), [0, 5, 20, 21])  # rows excluded by the caller
    a = RGE(eps_tilde=0.2, sketch_dim=sketch_dim, seed=4).aggregate_rows(G, rows)
    b = RGE(eps_tilde=0.2, sketch_dim=sketch_dim, seed=4).aggregate(G[rows])
    assert a.kept.tolist() == b.kept.tolist() and a.info["sketch_dim"] == sketch_dim
    assert not {3, 7, 11} & set(rows[a.kept].tolist())
    assert a.estimate.dtype == np.float32
    np.testing.assert_allclose(a.estimate, b.estimate, rtol=0, atol=1e-5)


def test_defence_with_mixing_maps_survivors_back_to_the_input_rows():
    rounds, _ = _federation(3, 16, 40, 10, np.float32, churn=False)
    rule = RobustDefence(eps_tilde=0.25, mixing=True)
    for G, ids in rounds:
        res = rule.aggregate(G, client_ids=ids)
        assert set(res.kept.tolist()) <= set(range(16)) - set(res.info["suspected"])
        assert np.isfinite(res.estimate).all() and res.estimate.dtype == np.float32
        assert np.count_nonzero(res.weights) == res.kept.size


def test_many_rows_run_the_spectral_fast_filter_even_at_small_d():
    rng = np.random.default_rng(3)
    G = rng.standard_normal((80, 50))
    G[:10] += 6.0
    res = RobustDefence(eps_tilde=0.2).aggregate(G, client_ids=list(range(80)))
    assert res.info["spectral_passes"] >= 1 and res.info["sketch_dim"] is None  # d = 50: no sketch
    assert set(res.dropped.tolist()) >= set(range(10))
    assert RobustDefence(eps_tilde=0.2, fast_above=None).aggregate(G).info["spectral_passes"] == 0


def test_fast_filter_choice_by_round_size():
    rule = RobustDefence(eps_tilde=0.2, seed=3)
    assert rule.filter_for(20, 650) is rule.filter  # the App's rounds: Algorithm 3's saddle solves
    assert rule.filter_for(20, 100_000).sketch_dim == 2048  # 2e6 entries
    assert rule.filter_for(100, 50) is rule.fast_filter  # more than 64 rows: spectral steps
    assert rule.filter_for(600, 10_000).sketch_dim == 1024  # many rows: a shorter sketch
    assert RobustDefence(fast_above=None).filter_for(1000, 10**6).sketch_dim is None
