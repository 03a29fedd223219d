"""The default defence's fast kernels (issue 12) take the decisions of the plain formulations.

:class:`~flwr_byzantine.aggregators.RobustDefence` computes a few things faster than it first
did: the coordinate-wise medians (the gross screen's centre, the self-reference drift) by a selection
network over blocks of the rows (:func:`~flwr_byzantine.aggregators.streaming.column_median`), the
gross screen's distances without an ``(R, d)`` temporary, the Gram matrices of row subsets without
copying the rows, and the nearest-neighbour mixing plus clipping as one combination of the rows
(:func:`~flwr_byzantine.aggregators.defence.mix_and_clip`: distances from the Gram matrix, no
``(n, d)`` mixture).  Here every one of them is swapped for its plain numpy formulation (the code
before issue 12's passes were cut) in a second instance of the rule, which replays the robustness
benchmark's rounds (``benchmarks/fastsim.py``, logistic regression and the MLP, client-side and
omniscient mobile attacks) next to the fast one: gross, jumped and suspected rows, the kept set and
the clipping must be identical in every round, and the estimates equal to float rounding.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest

from flwr_byzantine._backend import centred_gram
from flwr_byzantine.aggregators import defence as defence_mod
from flwr_byzantine.aggregators import temporal as temporal_mod
from flwr_byzantine.aggregators.defence import RobustDefence, mix_and_clip
from flwr_byzantine.aggregators.rge import RGE
from flwr_byzantine.aggregators.streaming import (clip_survivors, clip_to_references, column_median,
                                                  reference_deviation_stats, row_sq_norms, row_sq_norms_to)
from tolerances import SUM_RTOL


def plain_mix_and_clip(M, kept, f, clip_scale):
    """NNM then centered clipping as first written: the mixture ``Y = A M[kept]``, then its clipping."""
    from flwr_byzantine.aggregators.preagg import NearestNeighborMixing

    A, _ = NearestNeighborMixing(inner="mean", num_byzantine=f).mixing_matrix(M[kept])
    Y = (A @ M[kept]).astype(M.dtype, copy=False)
    centre = Y.mean(axis=0)
    if clip_scale is None:
        return centre, np.ones(kept.size), float("nan")
    return clip_survivors(Y, np.arange(kept.size), centre, clip_scale)


def plain_reference_deviation_stats(G, rows, table, slots, median_of=None, direction=None, groups=1, centre=None):
    """The self-reference's drift and squared deviations as first written (``(n, d)`` temporaries), and the changes
    from the references along ``direction`` (the evidence's statistics) in numpy; ``groups``: the median of the medians
    of that many consecutive groups of ``median_of``; ``centre``: also ``||a||^2`` and ``<a, e>`` with ``a = (ref +
    drift) - centre`` and ``e`` the deviation."""
    out = _plain_stats(G, rows, table, slots, median_of, direction, groups)
    if centre is None:
        return out
    ref = table[slots]
    drift = out[0]
    A = ((ref + drift) - np.asarray(centre, dtype=ref.dtype)).astype(np.float64)
    E = ((G[rows] - ref) - drift).astype(np.float64)
    return out + (np.einsum("ij,ij->i", A, A), np.einsum("ij,ij->i", A, E))


def _plain_stats(G, rows, table, slots, median_of, direction, groups):
    ref = table[slots]
    dev = G[rows] - ref
    change = dev.copy() if direction is not None else None
    if groups > 1:
        parts = np.split(np.asarray(median_of), groups)
        drift = np.median(np.stack([np.median(dev[p], axis=0) for p in parts]), axis=0).astype(dev.dtype)
    else:
        drift = np.median(dev if median_of is None else dev[median_of], axis=0)
    dev -= drift
    sq = np.einsum("ij,ij->i", dev, dev).astype(np.float64)
    if direction is None:
        return drift, sq
    X = change.astype(np.float64)
    return drift, sq, np.einsum("ij,ij->i", X, X), X @ np.asarray(direction, dtype=change.dtype).astype(np.float64)


def plain_clip_to_references(V, G, rows, table, slots, drift, factors, store=False, centre=None):
    ref = table[slots]
    dev = G[rows] - ref - drift
    clipped = ref + drift + dev * factors[:, None].astype(dev.dtype, copy=False)
    if V is not None:
        V[rows] = clipped
    if store or V is None:  # what SelfReference.apply's store of every seen row did for these rows
        table[slots] = clipped
    if centre is None:
        return None
    D = (clipped - np.asarray(centre, dtype=clipped.dtype)).astype(np.float64)
    return np.einsum("ij,ij->i", D, D)


def plain_aggregate_rows(self, updates, rows, *, sigma0=None, estimate=True, presketch=None):
    """``RGE.aggregate_rows`` as first written: the exact filter copies the rows out, the estimate always (no pass is
    handed over at these rounds' sizes: the screen is not sketched there)."""
    assert presketch is None
    from flwr_byzantine._backend import restore_dtype
    from flwr_byzantine.aggregators.rge import _blas_threads

    rows = np.asarray(rows, dtype=np.intp)
    with _blas_threads(self.blas_threads):
        if rows.size == updates.shape[0]:
            res = self._decode(updates, sigma0=sigma0)
        elif self.sketch_dim is not None and updates.shape[1] > 2 * self.sketch_dim and rows.size > 1:
            res = self._decode(updates, rows, sigma0=sigma0)
        else:
            res = self._decode(updates[rows], sigma0=sigma0)
    res.estimate = restore_dtype(res.estimate, updates)
    return res


PLAIN = {
    (RGE, "aggregate_rows"): plain_aggregate_rows,
    (defence_mod, "column_median"): lambda A: np.median(A, axis=0),
    (temporal_mod, "reference_deviation_stats"): plain_reference_deviation_stats,
    (temporal_mod, "clip_to_references"): plain_clip_to_references,
    (defence_mod, "row_sq_norms_to"): lambda A, c: row_sq_norms(A - np.asarray(c).astype(A.dtype, copy=False)),
    (defence_mod, "mix_and_clip"): plain_mix_and_clip,
    (defence_mod, "centred_gram"): lambda G, rows=None, **kw: centred_gram(G if rows is None else G[rows], **kw),
}


@contextlib.contextmanager
def plain_kernels():
    saved = {key: getattr(*key) for key in PLAIN}
    try:
        for (mod, name), fn in PLAIN.items():
            setattr(mod, name, fn)
        yield
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)


class StopReplay(Exception):
    """The two paths parted on a decision taken on rounding noise (see :meth:`ReplayCheck.aggregate`)."""


DECISIONS = ("gross", "jumped", "suspected", "clipped", "self_clipped")


class ReplayCheck:
    """Runs the fast rule (whose output drives the federation) and the plain one on every round."""

    def __init__(self, rule: RobustDefence, dtype=None, stop_at_noise: bool = False) -> None:
        self.fast, self.plain, self.dtype, self.stop_at_noise = rule, copy.deepcopy(rule), dtype, stop_at_noise
        self.noise_round: int | None = None
        self.rounds = 0
        self.worst = 0.0

    @property
    def evidence(self):  # the memory-aware attacker aims at the rule's evidence levels
        return self.fast.evidence

    def __deepcopy__(self, memo):  # what an omniscient defence-aware attacker simulates: the server's rule
        return copy.deepcopy(self.fast, memo)

    def aggregate(self, G, client_ids=None):
        # the replay is of the node-id path (memory, evidence, self-reference): a round without ids would compare
        # two stateless rules (fastsim passes the ids to every rule whose aggregate takes them)
        assert client_ids is not None
        if self.dtype is not None:
            G = np.asarray(G, dtype=self.dtype)
        a = self.fast.aggregate(G, client_ids=client_ids)
        with plain_kernels():
            b = self.plain.aggregate(G, client_ids=client_ids)
        if self.stop_at_noise and not np.array_equal(a.kept, b.kept):
            # a node whose evidence is rounding noise (every score ~1e-17: a memory-aware attacker
            # holding its score at exactly 0) is excluded or not by the last bit of the step; the
            # two paths may then part, but on nothing else
            rows = np.setxor1d(a.kept, b.kept)
            for rule in (self.fast, self.plain):
                st = rule.evidence._stats[rule.evidence._rows_of([client_ids[r] for r in rows])]
                assert np.abs(st[:, [0, 2]]).max() <= 1e-12, f"round {self.rounds}: rows {rows} are not at noise level"
            self.noise_round = self.rounds
            raise StopReplay
        assert np.array_equal(a.kept, b.kept), f"round {self.rounds}: kept {a.kept} vs {b.kept}"
        for key in DECISIONS:
            if key == "clipped":
                # a row at the clipping radius to rounding precision counts as clipped in one path and not in the
                # other (its factor 1 - 1e-16, or 1 - 1e-7 in float32, against 1; mixtures of rows with the same
                # neighbours tie at the median radius, seen at round 12 of the MLP's IPM replay): the rows clipped
                # by more than rounding must be the same, and the weights' check below bounds every factor
                tol = 1e-5 if np.asarray(G).dtype == np.float32 else 1e-9
                fa, fb = (r.weights[r.kept] * r.kept.size for r in (a, b))
                assert np.array_equal(fa < 1 - tol, fb < 1 - tol), f"round {self.rounds}: clipped {fa} vs {fb}"
                continue
            assert a.info.get(key) == b.info.get(key), f"round {self.rounds}: {key} {a.info.get(key)} vs {b.info.get(key)}"
        np.testing.assert_allclose(a.weights, b.weights, rtol=1e-5, atol=1e-9)
        ea, eb = np.asarray(a.estimate, dtype=np.float64), np.asarray(b.estimate, dtype=np.float64)
        rel = float(np.linalg.norm(ea - eb) / max(np.linalg.norm(eb), 1e-300))
        self.worst = max(self.worst, rel)
        assert rel <= (1e-5 if np.asarray(G).dtype == np.float32 else 1e-9), f"round {self.rounds}: relative error {rel}"
        self.rounds += 1
        return a


def replay(model: str, attack: str, rounds: int, seed: int = 0, dtype=None, alpha: float = 0.3,
           stop_at_noise: bool = False) -> ReplayCheck:
    from benchmarks.fastsim import SimConfig, simulate
    from benchmarks.robustness import build_rule

    adversary, mode = "client", "static"
    if attack.startswith("omni"):
        prefix, _, attack = attack.partition(":")
        adversary, mode = "omniscient", ("rotate" if prefix == "omni-rotate" else "static")
    rule, name = build_rule("rge", 20, 4)
    check = ReplayCheck(rule, dtype, stop_at_noise)
    cfg = SimConfig(alpha=alpha, model=model, num_nodes=20, num_malicious=4, attack=attack, adversary=adversary,
                    adversary_mode=mode, eps_tilde=0.2, rounds=rounds,
                    learning_rate=0.5 if model == "logreg" else 0.3, seed=seed, eval_every=rounds)
    try:
        simulate(cfg, check, name)
    except StopReplay:
        pass
    return check


@pytest.mark.parametrize("model,attack", [("logreg", "sign-flip"), ("logreg", "omni-rotate:defence-aware")])
def test_fast_kernels_take_the_plain_decisions_on_benchmark_rounds(model, attack):
    check = replay(model, attack, rounds=12)
    assert check.rounds == 12


@pytest.mark.slow
@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_fast_kernels_replay_memory_aware_rounds(model):
    """The memory-aware attacker keeps its scores at exactly 0 (rounding noise, ~1e-17): whether the
    evidence then excludes it is decided by the last bits of the step, in the plain code as in the fast
    one.  The paths must agree until such a decision, and part on nothing else."""
    check = replay(model, "memory-aware", rounds=40, stop_at_noise=True)
    # the round where a decision on rounding noise parts them is itself set by rounding: 11-14 with the numpy
    # passes, 8 on the MLP since the self-reference's deviations are summed in float64 (issue 12's compiled pass)
    assert check.rounds >= 8


@pytest.mark.slow
@pytest.mark.parametrize("model", ["logreg", "mlp"])
@pytest.mark.parametrize("attack", ["none", "alie", "ipm", "omni:defence-aware",
                                    "omni-rotate:defence-aware", "omni-rotate:sign-flip"])
def test_fast_kernels_replay_robustness_rounds(model, attack):
    rounds = 40 if model == "logreg" else 60
    check = replay(model, attack, rounds=rounds)
    assert check.rounds == rounds


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["alie", "omni-rotate:defence-aware"])
def test_fast_kernels_replay_float32_rounds(attack):
    check = replay("mlp", attack, rounds=40, dtype=np.float32)
    assert check.rounds == 40


def test_column_median_is_numpys_median_bit_for_bit():
    rng = np.random.default_rng(0)
    for R, d in [(1, 5), (2, 7), (3, 100), (20, 650), (64, 3000), (101, 2049)]:
        for dtype in (np.float32, np.float64):
            A = (rng.standard_normal((R, d)) * 10.0 ** rng.uniform(-3, 3)).astype(dtype)
            A[:, :3] = 1.0  # ties
            out = column_median(A)
            assert out.dtype == A.dtype and np.array_equal(out, np.median(A, axis=0))
    with pytest.raises(ValueError):
        column_median(np.zeros((0, 3)))


def test_row_sq_norms_to_matches_the_full_difference():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((9, 300_001)).astype(np.float32)
    c = rng.standard_normal(300_001)
    assert np.array_equal(row_sq_norms_to(A, c), row_sq_norms(A - c.astype(np.float32)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,d", [(3, 50), (4, 1000), (8, 70_001), (11, 300_000), (20, 650), (100, 10_000)])
def test_self_reference_kernels_are_the_plain_arithmetic(dtype, n, d):
    rng = np.random.default_rng(n)
    G = rng.standard_normal((n + 3, d)).astype(dtype)
    table = rng.standard_normal((n + 5, d)).astype(dtype)
    rows = np.sort(rng.choice(n + 3, n, replace=False))
    slots = rng.permutation(n + 5)[:n]
    drift, sq = reference_deviation_stats(G, rows, table, slots)
    drift0, sq0 = plain_reference_deviation_stats(G, rows, table, slots)
    assert drift.dtype == drift0.dtype and np.array_equal(drift, drift0)
    # the compiled pass sums each tile of squares in the rows' dtype and the tiles in float64 (the kernels'
    # *Reductions*): the exact sum of the dtype's differences to the tiles' rounding, numpy's float32 einsum to float32
    # rounding
    dev = (G[rows] - table[slots]) - drift0
    np.testing.assert_allclose(sq, np.sum(dev.astype(np.float64) ** 2, axis=1), rtol=SUM_RTOL[dtype])
    np.testing.assert_allclose(sq, sq0, rtol=2e-5 if dtype == np.float32 else 1e-12)
    factors = np.minimum(1.0, rng.uniform(0.2, 2.0, n))
    V, V0 = G.copy(), G.copy()
    clip_to_references(V, G, rows, table, slots, drift, factors)
    plain_clip_to_references(V0, G, rows, table, slots, drift0, factors)
    assert np.array_equal(V, V0)


def test_centred_gram_of_row_subsets_without_copies():
    rng = np.random.default_rng(2)
    G = rng.standard_normal((12, 5000)) + 3.0
    for rows in (np.arange(12), np.arange(2, 9), np.array([0, 3, 4, 10, 11])):
        np.testing.assert_allclose(centred_gram(G, rows=rows), centred_gram(G[rows]), rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("clip_scale", [1.0, 0.3, None])
def test_mix_and_clip_matches_the_explicit_mixture(clip_scale):
    rng = np.random.default_rng(3)
    M = rng.standard_normal((30, 4000)).astype(np.float32)
    M[:5] += 3.0  # a cluster that NNM must not mix with the rest
    kept = np.array([0, 1, 2, 5, 6, 7, 8, 9, 11, 13, 17, 19, 20, 21, 22, 25, 29])
    v, factors, radius = mix_and_clip(M, kept, 3, clip_scale)
    v0, factors0, radius0 = plain_mix_and_clip(M, kept, 3, clip_scale)
    np.testing.assert_allclose(v, v0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(factors, factors0, rtol=1e-5)
    # the rows clipped by more than rounding (the row at the median radius has a factor of 1 in one formulation and
    # 1 - 1e-16 in the other, depending on the machine's vectorisation of the float32 distances)
    assert np.array_equal(factors < 1.0 - 1e-5, factors0 < 1.0 - 1e-5)
    if clip_scale is not None:
        assert radius == pytest.approx(radius0, rel=1e-5)
        assert (factors < 1.0).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_survivors_trims_the_component_along_the_centre(dtype):
    """``trim``: only the component along ``u = centre / |centre|`` changes, to the trimmed mean of the rows'."""
    rng = np.random.default_rng(3)
    d, honest, byz = 200, 16, 4
    mean = np.zeros(d)
    mean[0] = 1.0
    H = mean + 3.0 * rng.standard_normal((honest, d))  # heterogeneity far larger than the mean
    Y = np.vstack([H, np.tile(mean * -6.0, (byz, 1)) + 0.01 * rng.standard_normal((byz, d))]).astype(dtype)
    rows = np.arange(honest + byz)
    centre = Y.astype(np.float64).mean(axis=0).astype(dtype)
    plain, f0, r0 = clip_survivors(Y, rows, centre, 1.0)
    trimmed, f1, r1 = clip_survivors(Y, rows, centre, 1.0, trim=byz)
    np.testing.assert_array_equal(f0, f1)
    assert r0 == r1
    c64 = centre.astype(np.float64)
    u = c64 / np.linalg.norm(c64)
    diff = trimmed.astype(np.float64) - plain.astype(np.float64)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(diff - (diff @ u) * u, 0.0, atol=tol)  # nothing changes across u
    p = np.sort((Y.astype(np.float64) - c64) @ u)
    want = float(np.linalg.norm(c64)) + float(np.mean(p[byz:-byz]))
    assert abs(float(trimmed.astype(np.float64) @ u) - want) < 10 * tol
    # the four rows that drag along the step (-6 times the mean) move the clipped estimate along u; the trim does not
    h = H.mean(axis=0)
    assert abs(float(trimmed.astype(np.float64) @ u) - h @ u) < abs(float(plain.astype(np.float64) @ u) - h @ u)
    # trim 0, or too few rows for the trim: the clipping alone
    np.testing.assert_array_equal(clip_survivors(Y, rows[:8], centre, 1.0, trim=4)[0],
                                  clip_survivors(Y, rows[:8], centre, 1.0)[0])
    # raise_only: this drag lowers the component along u, so the trim raises it and applies as it is
    np.testing.assert_array_equal(clip_survivors(Y, rows, centre, 1.0, trim=byz, raise_only=True)[0], trimmed)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_survivors_raise_only_never_shortens_the_step_under_an_orthogonal_bias(dtype):
    """A cluster off the step tilts ``u``; the trim taken either way then shortens the whole estimate, honest step
    included (it rescales the centre).  ``raise_only`` leaves the clipped estimate as it is there."""
    rng = np.random.default_rng(4)
    d, honest, byz = 200, 16, 4
    mean = np.zeros(d)
    mean[0] = 1.0
    H = mean + 0.5 * rng.standard_normal((honest, d))
    H -= H.mean(axis=0) - mean  # the honest mean exactly e_0
    off = np.zeros(d)
    off[1] = 8.0  # the bias, orthogonal to the step, inside the rows' spread
    Y = np.vstack([H, mean + off + 0.01 * rng.standard_normal((byz, d))]).astype(dtype)
    rows = np.arange(honest + byz)
    centre = Y.astype(np.float64).mean(axis=0).astype(dtype)
    plain = clip_survivors(Y, rows, centre, 1.0)[0].astype(np.float64)
    both = clip_survivors(Y, rows, centre, 1.0, trim=byz)[0].astype(np.float64)
    raised = clip_survivors(Y, rows, centre, 1.0, trim=byz, raise_only=True)[0].astype(np.float64)
    assert both[0] < 0.8 * plain[0]  # the honest step shortened by the trim taken either way
    np.testing.assert_array_equal(raised, plain)  # never shortened with raise_only

