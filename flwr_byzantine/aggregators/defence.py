"""The default defence: RGE with memory across rounds and bounded per-round bias.

Algorithm 3 of Data & Diggavi (the paper's RGE, :class:`~.rge.RGE`, registry name
``"rge-paper"``) is a single-round rule with a stopping threshold ``4 R sigma0^2``
chosen for its proof.  Under realistic attacks on heterogeneous clients that
constant lets subtle attacks (sign flip, ALIE, IPM, the defence-aware attack) pass,
and a single round cannot tell an attacker from an honest client with unusual data.
:class:`RobustDefence` (registry name ``"rge"``, the project's default) keeps the
filter and adds what a single round lacks:

1. **Memory across rounds, keyed by the Flower node id**
   (:class:`~.memory.MonotonicityEvidence`): gradients of a convex loss are monotone,
   ``<g_i(t) - g_i(t-1), x_t - x_{t-1}> >= 0``; a node whose replies violate this round after
   round (sign flip, IPM, anything that raises its own loss) is excluded once its evidence
   (``g_i(t-1)`` as the self-reference of step 4 remembers it, the last reply after its clipping:
   ``evidence_from_reference``)
   ``Z_i`` falls below the round's level ``min(-z_exclude, median(Z) - evidence_relative MADn(Z))``
   (``z_exclude = 1.5``: below -1.5, where the honest majority's own evidence is higher; the median and MADn
   of the nodes at or above -1.5 when they are a majority: ``evidence_relative_above``), at most
   ``floor(eps_tilde R)`` nodes, the most suspect first, re-decided every round.  Replies the round finds anomalous (gross outliers,
   jumps) are not scored, nor is the node's next reply against them, and the scores are
   winsorised (``score_clip``), so a mobile adversary cannot plant evidence on honest nodes.  Node ids
   come from the SuperLink, never from what a client claims.  Per-node worker momentum
   (:class:`~.memory.ClientMomentum`, Karimireddy, He, Jaggi 2021, Algorithm 2), kept by the server,
   ``momentum=0.7``, with input clipping: the filter and the clipping see ``m_i``, whose noise is
   ``sqrt((1 - beta) / (1 + beta))`` of a reply's, so honest nodes stand closer together and an attack
   inside one round's noise (min-max, ALIE) is averaged over rounds; the evidence and the jump rule
   judge the raw replies.
2. **A calibrated stopping rule** (Algorithm 3 line 5 with another constant):
   ``sum_i c_i tau_i <= threshold_factor * R * sigma0_hat^2`` with ``threshold_factor = 1.5``
   instead of the proof's 4 (``sigma0_hat^2`` is the automatic spectral estimate of
   :func:`~.sigma.estimate_sigma0_sq`); the benchmark reports the honest exclusion rate.
3. **Bounded per-round bias**: the survivors are combined by centered clipping
   around the filter's estimate, with radius ``clip_scale`` times the median
   distance of the survivors to it, so whatever survives the filter can move the
   estimate by at most ``(f / R) * clip_scale * median distance``.  Along the direction of the filter's
   estimate ``u`` (``step_trim``) the estimate's component is then raised to the trimmed mean of the survivors'
   components where that is larger, trimming from each side the budget the round has not spent: there the
   survivors can drag the step back only within the honest spread *along u*.  The radius is set by the
   heterogeneity in every direction (at alpha 0.3 several times the honest mean's norm), and an attacker that
   drags the step (IPM, the memory-aware attacker paying its evidence along the last step) moves the estimate
   along ``u``, where that spread is far smaller.  (Lowering the component too, the tenth landing's rule,
   shortens the whole step when a bias off the step has tilted ``u``.)
4. **Self-reference clipping** (:class:`~.temporal.SelfReference`, with node ids): a node's
   reply may move from its own previous (clipped) reply only by the common drift plus
   ``self_clip_scale`` times the round's median change: the clients' noise level, not their
   heterogeneity.  It bounds what a *mobile* adversary, which corrupts nodes that were honest a
   round ago, can do per round.  A reply that *jumps* (``jump_factor`` times the median change, and as many
   times the node's own typical change, counted up to the nodes' ``1 - eps_tilde`` quantile:
   a sleeper waking up, a node the mobile adversary has just taken) is left out of the round,
   within the ``floor(eps_tilde R)`` budget shared with the evidence (jumps first, the largest
   first; the evidence's suspects take what is left); its node's reference then
   follows only the drift, except in the reference's first ``reference_burn_in`` rounds, so a
   reference poisoned at first sight recovers.  The filter runs on the self-clipped rows, with ``sigma_0`` estimated from
   the raw replies (on the exact path).
5. **Gross outliers** (rows farther from the coordinate-wise median than ``gross_factor``
   times the median distance) are dropped before anything else sees them, so a few huge rows
   cannot inflate the filter's automatic ``sigma_0`` and smuggle one of them through.
6. **Mixing** (``mixing=True``, off by default): the filter's survivors are replaced by nearest-neighbour
   mixtures (Allouah et al. 2023, NNM) before the clipping, shrinking the heterogeneity in which a
   static attacker that knows the rule, its state and the node ids hides its shift.  With the worker
   momentum and the evidence it cost more than it bought on issue 10's grid (IPM -1.6, the sleeper -2.0
   at logreg alpha 0.3): it pulls the honest minority clients toward the majority.
7. **A spent budget** (``spend_budget=True``): the rule assumes at most ``floor(eps_tilde R)``
   Byzantine replies.  When the gross screen, the jumps and the evidence have already left out that
   many, the filter is skipped and the rest are averaged plainly; when the filter's removals complete
   the budget, the survivors are averaged without mixing and clipping.  Filtering, mixing and clipping
   honest rows only pull the estimate away from their minority clients (an honest client holding most
   of a rare class is far from the others): on the robustness grid's heterogeneous seeds that cost up
   to 12 points under attacks the memory had already fully excluded.
8. **Duplicates** (``duplicate_tol``, :mod:`.duplicates`): rows closer to one another than
   ``duplicate_tol`` times the round's median pairwise distance are one message sent by several
   nodes (honest replies differ at least by their mini-batch noise; colluding nodes that send one
   crafted vector do not): the group keeps its first row, the others are left out of the round
   (outside the budget of step 7, so copies cannot spend it).  The FoolsGold observation (Fung et
   al. 2020); attackers that add honest-sized noise are not duplicates and meet the other steps.
9. **Dropped replies leave no memory** (``fold_dropped=False``): a reply left out of the round (a gross
   or far outlier, a jump, a copy) is not folded into its node's worker momentum, and that memory is held
   as it was (:meth:`~.memory.ClientMomentum.hold`).  A mobile adversary that corrupts other nodes every
   round (``OmniscientAdversary``, rotate) otherwise leaves ``(1 - momentum)`` of each corrupted reply in
   the memory of every node it visits, where it outlives the visit and no jump rule sees it: on issue 10's
   grid that was its strongest lever (MLP, alpha 0.3: 92.8 against 94.7 without it).

Rounds of at least ``fast_above`` entries (issue 12) take two passes the fast way (``fast_passes``): a
sketched gross screen and a drift from sampled nodes.

With ``client_ids=None`` (e.g. a compressed round, where coordinates change every
round, or a caller without node ids) the memory step is skipped and the rule is
stateless for that call.  :meth:`state_dict` / :meth:`load_state_dict` carry the
memory through checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np

from .._backend import ArrayLike, centred_gram, is_torch, subset_mean
from ._generators import PrivateGenerator
from .base import AggregationResult, Aggregator
from .duplicates import DEFAULT_DUPLICATE_TOL, duplicate_rows, projects
from .memory import (DEFAULT_Q_FLOOR, DEFAULT_RELATIVE, DEFAULT_SCORE_CLIP, DEFAULT_Z_EXCLUDE, ClientMomentum,
                     MonotonicityEvidence)
from .rge import RGE
from .sigma import estimate_sigma0_sq
from .sketch import RowSketch, sketch_buckets, sketch_rows
from .streaming import clip_survivors, column_median, host_array, median_of, row_sq_norms, row_sq_norms_to
from .temporal import DEFAULT_BURN_IN, DEFAULT_JUMP_FACTOR, DEFAULT_SELF_CLIP_SCALE, SelfReference

#: Format tag of :meth:`RobustDefence.state_dict`.
STATE_FORMAT = "flwr-byzantine/robust-defence-v1"
#: Default momentum of the per-node memory (issue 10's grid, seeds 0-3, with the population floor 0.01 and
#: no mixing: 0.7 against 0.5 raises the memory-aware attacker by 1.2 points at logreg alpha 0.3 (0.5 was not
#: run on the MLP there); 0.9 cost the rotating omniscient defence-aware attack 0.7 points at MLP alpha 1.0,
#: whose corrupt set restarts the momentum of the nodes it leaves.  0.5 against 0 lowered the honest
#: exclusion below 1 % of client-rounds and held client-side min-max on the MLP, 95.6 against 92.3).
DEFAULT_MOMENTUM = 0.7
#: Default constant of the calibrated stopping rule (Algorithm 3 uses 4).
DEFAULT_THRESHOLD_FACTOR = 1.5
#: Default radius of the clipping of what enters a node's memory, in units of the round's median distance.
DEFAULT_INPUT_CLIP_SCALE = 1.0
#: Default distance, in median distances to the last estimate, beyond which a reply is left out of the
#: round rather than clipped into the worker momentum: -10x a gradient stays filtered in every round of
#: 4-, 5-, 10- and 20-node federations (it is clipped in, in 3-30 % of rounds, without this rule); at 3
#: the MLP's honest exclusion doubled (clean, alpha 0.3: 1.78 % against 0.95 %), at 4 it is unchanged.
DEFAULT_FAR_FACTOR = 4.0
#: Default clipping radius, as a multiple of the survivors' median distance to the filter's estimate.
DEFAULT_CLIP_SCALE = 1.0
#: Options of the default defence for replies that are model updates after local training, not
#: gradients (``RobustFedAvg``, the App's ``client-mode='local'``): the monotonicity evidence, the
#: self-reference clipping and the jump rule judge a node by its history of *gradients*; after several
#: local steps on a non-convex model an honest update need be neither monotone nor smooth from round
#: to round.  Mixing is off too: on the 10-client quickstart test (10 rounds) the self-reference
#: clipping cost 4 points and the mixing 1.5 (0.822 and 0.836 against > 0.85 without them).
MODEL_UPDATE_OPTIONS: dict[str, Any] = {"evidence": False, "self_clip_scale": None, "jump_factor": None, "mixing": False,
                                        "momentum": 0.0}
#: Rows farther than this many median distances from the coordinate-wise median are dropped for the round.
DEFAULT_GROSS_FACTOR = 8.0
#: Rounds with at least this many entries (R * d), or more than 64 rows, run the filter with
#: :data:`FAST_FILTER` (issue 12).
DEFAULT_FAST_ABOVE = 1 << 20
#: How the trimmed component along the step applies (``RobustDefence(step_trim=...)``): ``"raise"`` only where it
#: lengthens the step (the seventeenth landing), ``"both"`` either way (the tenth landing's rule).
STEP_TRIM_MODES = ("raise", "both")
DEFAULT_STEP_TRIM = "raise"
#: RGE's options for large rounds: the Gram matrix of a server-private sketch of length 2048 (when
#: d > 4096), the spectral filter step while more than 64 points are active.
FAST_FILTER = {"sketch_dim": 2048, "spectral_above": 64}
#: From this many rows on the fast filter's sketch has length 1024: its R x R Gram matrix costs
#: O(R^2 m) (as ``benchmarks.decode_time``'s ``rge-fast``); its sketching pass takes no column sums (the survivors'
#: mean is one BLAS product after the filter: :class:`~.rge.RGE`'s ``column_sums``).
FAST_MANY_ROWS, FAST_MANY_ROWS_SKETCH_DIM = 500, 1024
#: Rounds of at least ``fast_above`` entries with ``d > 2 * SCREEN_SKETCH_DIM`` screen gross outliers on a
#: server-private CountSketch of this length (:func:`~.sketch.sketch_rows`, fresh signs every round).
SCREEN_SKETCH_DIM = 2048
#: A sketched gross screen of more than this many rows takes its centre, the coordinate-wise median, from this many rows
#: drawn at random every round (issue 12: the selection network's cost grows as ``R log^2 R`` per column; at R = 1000
#: the median of all rows cost 0.46x ``np.mean``).  The screen drops rows beyond ``gross_factor = 8`` median distances:
#: a centre within ``1.25 / sqrt(127)`` = 0.11 of the honest spread per coordinate moves the distances by about 0.6 %,
#: and a sample of 127 holds a majority of attackers with a probability below 1e-10 at a quarter of them.
SCREEN_CENTRE_ROWS = 127
#: Rounds of at least ``fast_above`` entries take the self-reference drift from ``max(DRIFT_ROWS, min(R //
#: DRIFT_SHARE, DRIFT_MAX_ROWS))`` nodes (odd) drawn at random every round (the coordinate-wise median of all rows
#: costs a sort of R values per coordinate): the sample's noise and its Byzantine share stay close to the whole
#: round's.  The cap (issue 12): the selection network's cost grows faster than the sample (at R = 1000, d = 1e5,
#: 52 ms over the deviations' read for 251 nodes, 21 ms for 127); with 127 nodes the drift's noise, of which a
#: clipped row keeps its clipped share, is about the round mean's own (1.25 / sqrt(127) = 0.11 of the honest spread
#: per coordinate, against 1 / sqrt(R) = 0.03 for the mean, times the quarter of a row clipping takes away).
#: Above ``DRIFT_ROWS`` (issue 12, the twenty-first landing) the sample is :func:`drift_groups` groups of ``DRIFT_ROWS``
#: and the drift the median of the groups' medians, at least as precise as the median of the target it replaces: a
#: group of 31 runs the unrolled network, and at R = 1000, d = 1e5 the drift of 7 groups (217 nodes) cost 0.8-1.0x
#: ``np.mean`` where the median of 127 cost 2.2-2.9x (the pass less its deviations' read; an AVX2 machine).
DRIFT_ROWS, DRIFT_SHARE, DRIFT_MAX_ROWS = 31, 4, 127


def drift_groups(target: int, group: int) -> int:
    """The fewest (odd) groups of ``group`` values whose median of medians is as precise as the median of ``target``
    values (1 for ``target <= group``).  For Gaussian changes the median of ``n`` values has a variance of about
    ``pi sigma^2 / (2 (n + 1/2))`` (0.449 for 3 values, 0.287 for 5, exact 0.4487, 0.2868), so ``k`` groups suffice when
    ``target + 1/2 <= (2 / pi) (k + 1/2) (group + 1/2)``: for groups of 31, 3 up to 69 values, 5 up to 109, 7 up to 149.
    """
    if target <= group:
        return 1
    k = 3
    while target + 0.5 > (2.0 / np.pi) * (k + 0.5) * (group + 0.5):
        k += 2
    return k


def mix_and_clip(M: np.ndarray, kept: np.ndarray, f: int, clip_scale: float | None
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """Nearest-neighbour mixing of ``M[kept]`` then one centered-clipping step around the mixtures' mean.

    NNM (Allouah et al. 2023, Algorithm 1): ``y_k = (1 / (n - f)) sum of the n - f rows nearest to
    row k`` (itself included), ``Y = A M[kept]``; then ``centre = mean_k y_k`` and
    :func:`~.streaming.clip_survivors`' step ``v = centre + (1/n) sum_k (min(1, r / ||y_k - centre||) - 1)
    (y_k - centre)`` with ``r = clip_scale * median_k ||y_k - centre||`` (``clip_scale`` ``None``: ``v =
    centre``).  Everything is a combination of the rows: with ``w = 1^T A / n`` and ``B = A - 1 w^T``,
    ``||y_k - centre||^2 = b_k^T K b_k`` for the rows' (centred) Gram matrix ``K``, which also gives the
    neighbours, and ``v = (w + (1/n) sum_k (factor_k - 1) b_k)^T M[kept]``: one Gram product (rows
    gathered chunk by chunk) and one weighted sum over the rows, no ``(n, d)`` mixture.
    Returns ``(v, factors, r)`` as :func:`~.streaming.clip_survivors` does.
    """
    from .._backend import weighted_sum
    from .preagg import NearestNeighborMixing

    n = kept.size
    K = centred_gram(M, rows=kept)
    A, _ = NearestNeighborMixing(inner="mean", num_byzantine=f).mixing_matrix_from_gram(K)
    w = A.mean(axis=0)
    beta, factors, radius = w, np.ones(n), float("nan")
    if clip_scale is not None:
        B = A - w
        dist = np.sqrt(np.maximum(np.einsum("ij,ij->i", B @ K, B), 0.0))
        radius = clip_scale * median_of(dist)
        if radius > 0:
            with np.errstate(divide="ignore", invalid="ignore"):
                factors = np.where(dist > radius, radius / np.maximum(dist, 1e-300), 1.0)
            beta = w + ((factors - 1.0) / n) @ B
    coef = np.zeros(M.shape[0])
    coef[kept] = beta
    return np.asarray(weighted_sum(M, coef)), factors, radius


def _rows_without(R: int, *excluded: np.ndarray) -> np.ndarray:
    """The rows ``0..R-1`` in none of ``excluded`` (row numbers), ascending: ``np.setdiff1d(np.arange(R), union)``
    with a mask instead of numpy's sorts (about 14 us a call at 20 rows against 2 us)."""
    mask = np.ones(R, dtype=bool)
    for rows in excluded:
        mask[np.asarray(rows, dtype=np.intp)] = False
    return np.flatnonzero(mask)


class RobustDefence(Aggregator):
    """The project's default defence (registry name ``"rge"``): memory + calibrated RGE + clipping.

    Parameters
    ----------
    eps_tilde:
        Assumed Byzantine fraction (at most 1/4, as Algorithm 3 requires).
    momentum:
        ``beta`` of the per-node memory ``m_i <- beta m_i + (1 - beta) g_i`` (default 0.7); 0 disables it.
    threshold_factor:
        Constant ``c`` of the stopping rule ``sum_i c_i tau_i <= c R sigma0^2`` (Algorithm 3 line 5
        uses 4).
    clip_scale:
        Radius of the centered clipping of the survivors, in units of their median distance to
        the filter's estimate; ``None`` disables clipping (the estimate is the survivors' mean,
        Algorithm 3 line 12).
    sigma0:
        Explicit ``sigma_0`` for the filter, or ``None`` for the automatic estimate.
    max_idle_rounds:
        A node absent for more than this many calls starts a fresh memory when it returns.
    evidence, z_exclude, evidence_gamma:
        The monotonicity evidence (on/off, exclusion level: a node is suspected when
        ``Z_i < -z_exclude``, discount).
    score_clip:
        Winsorisation of the evidence's scores, in units of the round's median ``|score|``
        (``None``: raw scores).
    skip_anomalies:
        Gross outliers and jumps are not scored by the evidence, nor is their node's next reply.
    reference_burn_in:
        For the first rounds of a node's reference a jump is followed like any change
        (:class:`~.temporal.SelfReference`'s ``burn_in``); afterwards a jumped node's reference
        follows only the common drift.
    evidence_relative:
        Width of the evidence's relative level: a round's level is
        ``min(-z_exclude, median(Z) - evidence_relative * MADn(Z))`` (``None``: ``-z_exclude``).
    evidence_relative_above:
        ``True`` (default, the twentieth landing): that median and MADn are the nodes' at or above ``-z_exclude`` when
        they are a majority (:meth:`~.memory.MonotonicityEvidence._level`), so a cluster of suspects below the fixed
        level cannot widen it (ten sign flippers among 40 nodes were excluded in half the rounds); ``False``: every
        eligible node's (the robustness benchmark's ablation ``rge/level-all-nodes``).
    evidence_floor:
        Population floor of the evidence's normaliser, ``Z_i = S_i / sqrt(Q_i + evidence_floor * median(Q))``
        (``None``: the scale-free ``S_i / sqrt(Q_i)``, under which scores at rounding level give any ``Z``).
    spend_budget:
        Skip the filter (and the mixing and clipping) once ``floor(eps_tilde R)`` rows are left out
        before it, and the mixing and clipping once the filter's removals complete that budget (step 7).
    mixing:
        Nearest-neighbour mixing (Allouah et al. 2023, NNM) of the filter's survivors before the
        clipping: each is replaced by the mean of its ``n - f`` nearest survivors, which shrinks the
        heterogeneity a static attacker hides in; off by default (issue 10's grid: with the worker
        momentum it shrinks the honest minority clients more than the attackers' room; IPM -1.6 and the
        sleeper -2.0 points with it at logreg alpha 0.3).
    input_clip_scale:
        Clipping of what enters the worker momentum (only with ``momentum > 0``), in units of the
        round's median distance to the last estimate.
    far_factor:
        With the input clipping: a reply farther than ``far_factor`` median distances from the last
        estimate is left out of the round (and of its node's memory) instead of being clipped into it,
        the farthest first, within the ``floor(eps_tilde R)`` budget left by the evidence and the jumps;
        reported with the gross outliers.  ``None``: every reply is clipped.
    gross_factor:
        Rows farther than ``gross_factor`` times the median distance from the coordinate-wise
        median are dropped for the round; ``None`` disables the screen.
    self_clip_scale:
        Radius of the self-reference clipping (:class:`~.temporal.SelfReference`), in units of
        the round's median change of a node's reply; ``None`` disables it.
    jump_factor:
        A node whose reply jumps from its own reference by more than ``jump_factor`` times the
        round's median change, and as many times its own typical change (``jump_own_scale``), is left out of
        the round (within the ``floor(eps_tilde R)`` budget, together with the evidence's suspects) and its
        reference only follows the common drift; ``None`` disables it.
    jump_own_scale:
        ``True`` (default): a jump is judged against the larger of the round's median change and the node's
        own scale (the median of its last changes, :meth:`~.temporal.SelfReference.own_scales`), counted up to the
        ``1 - eps_tilde`` quantile of the nodes' own scales (``own_cap``: the Byzantine share cannot set it), so
        honest clients whose mini-batch noise is larger than most are not left out round after round; ``False``:
        against the round's median alone (the seventeenth landing's rule).
    fast_above:
        Rounds with at least this many entries ``R * d``, or more than 64 rows, run RGE with
        :data:`FAST_FILTER` (a sketched Gram matrix when ``d > 4096``, fresh server-private signs
        every round; spectral steps while more than 64 points are active); ``None``: always the
        exact filter (Algorithm 3's saddle solves on the exact Gram matrix).
    fast_passes:
        In rounds of at least ``fast_above`` entries (issue 12): the gross screen's centre and distances on
        a CountSketch of length :data:`SCREEN_SKETCH_DIM` of the rows (when ``d > 2 *`` that length; the centre from
        :data:`SCREEN_CENTRE_ROWS` rows drawn at random when there are more), and
        the self-reference drift from ``max(DRIFT_ROWS, min(R // DRIFT_SHARE, DRIFT_MAX_ROWS))`` nodes drawn at random (when more
        have a reference; above ``DRIFT_ROWS``, the median of the medians of :func:`drift_groups` random groups of
        ``DRIFT_ROWS``, as precise), both from a server-private generator, fresh every round (attributes
        ``screen_sketch_dim`` and ``drift_rows``); ``False``: the exact passes at every size.  Where the filter reads
        the rows the screen sketched (no node ids, or neither memory nor self-reference), the screen's pass takes the
        sketch of the filter's length with the filter's norms and column sums, and the filter uses it (one pass over
        the rows a round instead of two; :class:`~.sketch.RowSketch`).
    duplicate_tol:
        Rows closer than this fraction of the round's median pairwise distance are duplicates: one
        row of each group is kept (step 8, :func:`~.duplicates.duplicate_rows`); ``None`` disables it.
    step_trim:
        With the clipping (step 3), the trimmed mean of the survivors' components along the filter's estimate,
        trimming from each side the Byzantine budget the round has not yet spent (:func:`~.streaming.clip_survivors`'
        ``trim``).  ``"raise"`` (default): it replaces the clipped estimate's component along that direction only
        where it is larger, so a step dragged back is restored and no step is shortened.  ``"both"`` (or ``True``;
        the tenth landing's rule): it replaces the component either way.  That shortens the whole step when the
        survivors' bias lies off the step, and the bias's tilt of the direction rescales the estimate instead of
        removing the bias (the ``orthogonal`` attack, omniscient, MLP alpha 0.3, seeds 11-13: 91.9 against 94.2).
        ``False``: the clipped estimate as it is.
    fold_dropped:
        ``False`` (default): a reply left out of the round as a jump or as a copy of another row, like a
        gross outlier, enters no memory, and its node's memory is held as it was
        (:meth:`~.memory.ClientMomentum.hold`: the node's next reply is blended in, not restarted from).
        ``True`` (the ninth landing's rule): jumps and copies are clipped into their nodes' memories like every
        kept reply, so a mobile adversary leaves ``(1 - momentum)`` of each corrupted reply in the memory of a
        node it has left, for the rounds after; a gross or far outlier's node restarts its memory at its next
        reply.
    evidence_from_reference:
        With the self-reference clipping (step 4): the evidence scores each reply's change from its node's reference
        (the node's last reply as clipped), taken by the self-reference's pass over the rows
        (:meth:`~.memory.MonotonicityEvidence.observe_changes`), and no table of raw last replies is kept: one pass
        over the rows and one table of their size fewer (issue 12).  On issue 10's grid (seeds 0-3, every attack) it
        measured as the raw last replies did (mean accuracy +0.04 / +0.01 / +0.01 / -0.01 points; the memory-aware
        attacker +0.8 at logreg alpha 0.3).  ``False`` (or without the self-reference): the change from the raw last
        reply (:meth:`~.memory.MonotonicityEvidence.observe`).
    seed:
        Seed of the sketch's generator (``None``: fresh OS entropy; the filter for 500 rows or more
        uses ``seed + 1``, the fast passes ``[seed, 12]``, the duplicates' sketch ``[seed, 13]``).  Each generator is
        made on its first use (:class:`~._generators.PrivateGenerator`): a rule that never sketches reads no entropy.
    """

    name = "rge"
    #: Private generators of the fast passes (the screen's sketch, the drift's sample) and of the duplicates'
    #: projection, made on first use (small rounds use neither).
    _pass_rng = PrivateGenerator()
    _duplicate_rng = PrivateGenerator()

    def __init__(
        self,
        eps_tilde: float = 0.25,
        momentum: float = DEFAULT_MOMENTUM,
        threshold_factor: float = DEFAULT_THRESHOLD_FACTOR,
        clip_scale: float | None = DEFAULT_CLIP_SCALE,
        sigma0: float | None = None,
        max_idle_rounds: int = 1,
        evidence: bool = True,
        z_exclude: float = DEFAULT_Z_EXCLUDE,
        evidence_gamma: float = 0.95,
        mixing: bool = False,
        input_clip_scale: float | None = DEFAULT_INPUT_CLIP_SCALE,
        far_factor: float | None = DEFAULT_FAR_FACTOR,
        gross_factor: float | None = DEFAULT_GROSS_FACTOR,
        self_clip_scale: float | None = DEFAULT_SELF_CLIP_SCALE,
        jump_factor: float | None = DEFAULT_JUMP_FACTOR,
        jump_own_scale: bool = True,
        fast_above: int | None = DEFAULT_FAST_ABOVE,
        seed: int | None = None,
        score_clip: float | None = DEFAULT_SCORE_CLIP,
        skip_anomalies: bool = True,
        reference_burn_in: int = DEFAULT_BURN_IN,
        evidence_relative: float | None = DEFAULT_RELATIVE,
        evidence_floor: float | None = DEFAULT_Q_FLOOR,
        evidence_relative_above: bool = True,
        spend_budget: bool = True,
        fast_passes: bool = True,
        duplicate_tol: float | None = DEFAULT_DUPLICATE_TOL,
        fold_dropped: bool = False,
        step_trim: bool | str = DEFAULT_STEP_TRIM,
        evidence_from_reference: bool = True,
    ) -> None:
        self.evidence_from_reference = bool(evidence_from_reference)
        self.fold_dropped = bool(fold_dropped)
        if step_trim is True:
            step_trim = "both"
        if not (step_trim is False or step_trim is None or step_trim in STEP_TRIM_MODES):
            raise ValueError(f"step_trim must be one of {STEP_TRIM_MODES}, True ('both') or False, got {step_trim!r}")
        #: ``"raise"``, ``"both"`` or ``None`` (off): see the class docstring.
        self.step_trim: str | None = step_trim or None
        self.fast_passes = bool(fast_passes)
        #: Fast rounds fuse passes over the rows (issue 12; the same results bit for bit, one read fewer each).
        self.fuse_passes = True
        self.screen_sketch_dim, self.drift_rows = SCREEN_SKETCH_DIM, DRIFT_ROWS
        self._pass_rng = None if seed is None else [int(seed), 12]  # seeds (PrivateGenerator)
        if duplicate_tol is not None and not (np.isfinite(duplicate_tol) and 0 < duplicate_tol < 1):
            raise ValueError(f"duplicate_tol must be in (0, 1) or None, got {duplicate_tol!r}")
        self.duplicate_tol = None if duplicate_tol is None else float(duplicate_tol)
        self._duplicate_rng = None if seed is None else [int(seed), 13]
        self.spend_budget = bool(spend_budget)
        self.skip_anomalies = bool(skip_anomalies)
        if not (np.isfinite(momentum) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if clip_scale is not None and not (np.isfinite(clip_scale) and clip_scale > 0):
            raise ValueError(f"clip_scale must be a positive finite number or None, got {clip_scale!r}")
        self.filter = RGE(eps_tilde=eps_tilde, sigma0=sigma0, threshold_factor=threshold_factor)
        if fast_above is not None and (isinstance(fast_above, bool) or int(fast_above) != fast_above or fast_above < 1):
            raise ValueError(f"fast_above must be a positive integer or None, got {fast_above!r}")
        self.fast_above = None if fast_above is None else int(fast_above)
        self.fast_filter = RGE(eps_tilde=eps_tilde, sigma0=sigma0, threshold_factor=threshold_factor, seed=seed,
                               **FAST_FILTER)
        self.fast_filter_many_rows = RGE(eps_tilde=eps_tilde, sigma0=sigma0, threshold_factor=threshold_factor,
                                         seed=None if seed is None else seed + 1,
                                         **(FAST_FILTER | {"sketch_dim": FAST_MANY_ROWS_SKETCH_DIM,
                                                           "column_sums": False}))
        self.eps_tilde = self.filter.eps_tilde
        self.momentum = float(momentum)
        self.threshold_factor = self.filter.threshold_factor
        self.clip_scale = None if clip_scale is None else float(clip_scale)
        self.sigma0 = self.filter.sigma0
        self.memory = ClientMomentum(beta=self.momentum, max_idle_rounds=max_idle_rounds)
        self.evidence = (MonotonicityEvidence(gamma=evidence_gamma, z_exclude=z_exclude, score_clip=score_clip,
                                              relative=evidence_relative, q_floor=evidence_floor,
                                              relative_above=evidence_relative_above)
                         if evidence else None)
        self.mixing = bool(mixing)
        if input_clip_scale is not None and not (np.isfinite(input_clip_scale) and input_clip_scale > 0):
            raise ValueError(f"input_clip_scale must be a positive finite number or None, got {input_clip_scale!r}")
        self.input_clip_scale = None if input_clip_scale is None else float(input_clip_scale)
        if far_factor is not None and not (np.isfinite(far_factor) and far_factor > 1.0):
            raise ValueError(f"far_factor must be a finite number > 1 or None, got {far_factor!r}")
        self.far_factor = None if far_factor is None else float(far_factor)
        if gross_factor is not None and not (np.isfinite(gross_factor) and gross_factor > 1.0):
            raise ValueError(f"gross_factor must be a finite number > 1 or None, got {gross_factor!r}")
        self.gross_factor = None if gross_factor is None else float(gross_factor)
        self.self_reference = (None if self_clip_scale is None
                               else SelfReference(scale=self_clip_scale, jump_factor=jump_factor,
                                                  burn_in=reference_burn_in, own_scale=jump_own_scale,
                                                  own_cap=1.0 - self.eps_tilde))
        self._pending_step: np.ndarray | None = None
        self._last_estimate: np.ndarray | None = None
        self._scratch: np.ndarray | None = None  # buffer of the self-clipped rows (no state: reused every round)
        self._memory_out: np.ndarray | None = None  # buffer of the rows' memories (no state: reused every round)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_scratch"] = state["_memory_out"] = None  # buffers, not state: copies and pickles go without them
        return state

    def observe_step(self, delta: ArrayLike) -> None:
        """Tell the rule the model step ``x_{t+1} - x_t`` actually taken after its last output.

        Optional: without it the rule assumes the step was along ``-estimate``.
        """
        self._pending_step = host_array(delta).reshape(-1).copy()

    def __repr__(self) -> str:
        return (f"RobustDefence(eps_tilde={self.eps_tilde}, momentum={self.momentum}, "
                f"threshold_factor={self.threshold_factor}, clip_scale={self.clip_scale}, sigma0={self.sigma0})")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(JSON part, arrays by name)``: the per-node memory and evidence and the last step.

        Array names (``memory.momenta``, ``evidence.last``, ``self_reference.refs``, ``last_estimate``,
        ``pending_step``)
        are part of the checkpoint format; they name no private attribute.
        """
        arrays: dict[str, np.ndarray] = {}
        mem = self.memory.state_dict()
        arrays["memory.momenta"] = mem.pop("momenta")
        state: dict[str, Any] = {"format": STATE_FORMAT, "memory": mem, "evidence": None}
        if self.evidence is not None:
            ev = self.evidence.state_dict()
            arrays["evidence.last"] = ev.pop("last")
            state["evidence"] = ev
        state["self_reference"] = None
        if self.self_reference is not None:
            ref = self.self_reference.state_dict()
            arrays["self_reference.refs"] = ref.pop("refs")
            state["self_reference"] = ref
        for key, val in (("last_estimate", self._last_estimate), ("pending_step", self._pending_step)):
            if val is not None:
                arrays[key] = val.copy()
        return state, arrays

    def load_state_dict(self, state: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                        *, dim: int | None = None) -> None:
        """Restore :meth:`state_dict` output; ``ValueError`` on malformed state (nothing changes then)."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError("not a robust-defence state (missing or unknown 'format')")
        if (state.get("evidence") is None) != (self.evidence is None):
            raise ValueError("state and rule disagree on whether the evidence memory is on")
        if (state.get("self_reference") is None) != (self.self_reference is None):
            raise ValueError("state and rule disagree on whether the self-reference clipping is on")
        known = {"memory.momenta", "evidence.last", "self_reference.refs", "last_estimate", "pending_step"}
        if set(arrays) - known:
            raise ValueError(f"unknown state arrays {sorted(set(arrays) - known)}")
        vecs: dict[str, np.ndarray | None] = {}
        for key in ("last_estimate", "pending_step"):
            v = arrays.get(key)
            if v is not None:
                v = np.asarray(v, dtype=np.float64).reshape(-1)
                if not np.isfinite(v).all() or (dim is not None and v.size != dim):
                    raise ValueError(f"{key} is not a finite vector of size {dim}")
            vecs[key] = v
        memory = ClientMomentum(beta=self.memory.beta, max_idle_rounds=self.memory.max_idle_rounds)
        memory.load_state_dict({**dict(state["memory"]), "momenta": arrays.get("memory.momenta", np.zeros((0, 0)))})
        if dim is not None and len(memory) and memory.state_dict()["momenta"].shape[1] != dim:
            raise ValueError(f"memory vectors do not have size {dim}")
        evidence = None
        if self.evidence is not None:
            evidence = MonotonicityEvidence(self.evidence.gamma, self.evidence.z_exclude, self.evidence.min_rounds,
                                            self.evidence.gamma_short, self.evidence.z_short, self.evidence.score_clip,
                                            self.evidence.relative, self.evidence.q_floor)
            evidence.load_state_dict({**dict(state["evidence"]), "last": arrays.get("evidence.last", np.zeros((0, 0)))})
        self_reference = None
        if self.self_reference is not None:
            self_reference = SelfReference(scale=self.self_reference.scale, min_rows=self.self_reference.min_rows,
                                           jump_factor=self.self_reference.jump_factor,
                                           burn_in=self.self_reference.burn_in,
                                           own_scale=self.self_reference.own_scale,
                                           own_cap=self.self_reference.own_cap)
            self_reference.load_state_dict({**dict(state["self_reference"]),
                                            "refs": arrays.get("self_reference.refs", np.zeros((0, 0)))})
            if dim is not None and len(self_reference) and self_reference.refs.dim != dim:
                raise ValueError(f"self-reference vectors do not have size {dim}")
        self.memory, self.evidence, self.self_reference = memory, evidence, self_reference
        self._last_estimate, self._pending_step = vecs["last_estimate"], vecs["pending_step"]

    def reset(self) -> None:
        """Forget every node's memory, evidence and reference."""
        self.memory.reset()
        if self.evidence is not None:
            self.evidence.reset()
        if self.self_reference is not None:
            self.self_reference.reset()
        self._last_estimate = self._pending_step = None

    # ------------------------------------------------------------------ rule

    def aggregate(self, updates: ArrayLike, client_ids: Sequence[int] | None = None) -> AggregationResult:
        """Aggregate the rows of ``updates``; ``client_ids[i]`` is the node id of row ``i`` (memory key)."""
        from .._backend import check_matrix, restore_dtype

        checked = check_matrix(updates, widen_large=True, screen=False)
        # rounds whose gross screen sketches the rows take the NaN/Inf and energy check from that pass
        screened = not self._screen_sketched(checked)
        if screened:
            checked = check_matrix(checked, widen_large=True)
        if client_ids is not None and len(client_ids) != checked.shape[0]:
            raise ValueError(f"client_ids has {len(client_ids)} entries for {checked.shape[0]} rows")
        result = self._run(checked, client_ids, screened=screened)
        if checked is not updates:
            result.estimate = restore_dtype(result.estimate, updates)
        return result

    def _aggregate(self, updates: ArrayLike) -> AggregationResult:
        return self._run(updates, None)

    def filter_for(self, R: int, d: int) -> RGE:
        """The exact filter, or the fast one for rounds of at least ``fast_above`` entries or more than
        ``FAST_FILTER["spectral_above"]`` rows (where the saddle solves cost O(R^3) each); from
        :data:`FAST_MANY_ROWS` rows on its sketch is :data:`FAST_MANY_ROWS_SKETCH_DIM` long."""
        if self.fast_above is None:
            return self.filter
        if not (R * d >= self.fast_above or R > FAST_FILTER["spectral_above"]):
            return self.filter
        return self.fast_filter_many_rows if R >= FAST_MANY_ROWS else self.fast_filter

    def _fast_round(self, R: int, d: int) -> bool:
        """Whether a round of ``R x d`` entries runs the fast passes (``fast_passes``, at least ``fast_above`` entries)."""
        return bool(self.fast_passes and self.fast_above is not None and R * d >= self.fast_above)

    def _fast_centre(self, R: int, d: int, dtype: Any) -> np.ndarray | None:
        """The worker momentum's input-clipping centre (the last estimate) when a fast round's self-reference pass
        takes the rows' distances to it from its deviations' sums, before it clips them (fused passes or not), else
        ``None``."""
        if not (self._fast_round(R, d) and self.momentum > 0 and self.input_clip_scale is not None
                and R > 2 and self._last_estimate is not None and self._last_estimate.shape[0] == d):
            return None
        return np.ascontiguousarray(self._last_estimate, dtype=dtype)

    def _fold_sketch(self, filt: RGE, R: int, d: int, G: np.ndarray) -> tuple[np.ndarray, Any] | None:
        """The request (:meth:`~.rge.RGE.presketch_request`) of ``filt``, the sketched filter that will read the
        memories of the ``R x d`` rows ``G`` (the caller asks only when it will run on at least two of them), when the
        memories' fold can fill it (numpy rows whose memories keep their dtype), else ``None`` (nothing drawn)."""
        if is_torch(G) or G.dtype not in (np.float32, np.float64) or not self.memory.keeps(G.dtype):
            return None
        return filt.presketch_request(R, d, G.dtype)

    def _self_clip(self, keep_rows: np.ndarray, src: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The memories' fold's ``self_clip`` (:meth:`~.memory.ClientMomentum.fold_rows`) for the self-reference's
        deferred clipping (:meth:`~.temporal.SelfReference.deferred`): the drift and each folded row's factor, where
        every folded row with a reference (``src >= 0``) is one the clipping left (else ``None``, after clipping them
        all into the table: the fold then reads them there, as the unfused passes do)."""
        plan = self.self_reference.deferred()
        if plan is None:
            return None
        mine = src >= 0
        at = np.searchsorted(plan.rows, keep_rows[mine])  # both ascending
        if not (at.size == 0 or (int(at.max()) < plan.rows.size and np.array_equal(plan.rows[at], keep_rows[mine]))):
            self.self_reference.finish_clip()  # (not expected: a folded row with a reference the clipping did not see)
            return None
        factors = np.ones(keep_rows.size, dtype=plan.factors.dtype)
        factors[mine] = plan.factors[at]
        return plan.drift, factors

    def _screen_sketched(self, updates: ArrayLike) -> bool:
        """Whether the gross screen of ``updates`` runs on a sketch of numpy float32/float64 rows (one compiled pass
        that also gives the rows' squared norms, which :meth:`_run` then uses as the input check)."""
        if is_torch(updates) or updates.dtype not in (np.float32, np.float64):
            return False
        R, d = updates.shape
        return self.gross_factor is not None and R > 2 and self._fast_round(R, d) and d > 2 * self.screen_sketch_dim

    def _screen_sketch(self, G: np.ndarray, screened: bool,
                       filt: RGE | None = None) -> tuple[np.ndarray, np.ndarray, RowSketch | None]:
        """The gross screen's sketch of ``G`` (fresh private signs); unless ``screened``, the input check of
        :func:`~flwr_byzantine._backend.check_matrix` on the squared norms of the same pass: a NaN/Inf raises
        ``ValueError`` (nothing is changed; the private generator is rewound), an energy above ``LARGE_ENERGY``
        widens the rows to float64 and sketches them again.  ``filt``: the sketched filter that will read these rows
        unchanged (no memory, no self-reference); the pass then takes what that filter's own pass would (the sketch of
        its length in float64, the rows' squared norms, its column sums) and hands it over (one pass over the rows
        fewer).
        Returns ``(G, sketch, handed over or None)``."""
        from .._backend import LARGE_ENERGY, check_matrix

        state = self._pass_rng.bit_generator.state
        sq = np.empty(G.shape[0])
        # float32 rows: the sketch kept in float32 (the screen's distances and the duplicates' float32 projection need
        # no more; half the bytes, and no float32 copy for the projection), unless the filter takes it over
        # (the screen then takes the filter's length: from FAST_MANY_ROWS rows on, 1024 instead of 2048)
        share = filt is not None and filt.sketch_dim is not None and G.shape[1] > 2 * filt.sketch_dim
        dim = filt.sketch_dim if share else self.screen_sketch_dim
        sums = np.empty(G.shape[1], dtype=G.dtype) if share and filt.sums_columns(G.shape[1], G.dtype) else None
        Y = sketch_rows(G, dim, self._pass_rng, sq_norms=sq, col_sums=sums,
                        dtype=np.float32 if G.dtype == np.float32 and not share else np.float64)
        handed = RowSketch(Y, sq, sums, dim) if share else None
        energy = float(np.sum(sq))
        if screened or (np.isfinite(energy) and energy <= LARGE_ENERGY):
            return G, Y, handed
        self._pass_rng.bit_generator.state = state
        G = check_matrix(G, widen_large=True)  # raises on NaN/Inf; large entries: float64
        return G, sketch_rows(G, dim, self._pass_rng), None

    def _run(self, updates: ArrayLike, client_ids: Sequence[int] | None, screened: bool = True) -> AggregationResult:
        # Works in the input's dtype on the host (float32 stays float32; scalars in float64): every
        # pass over the rows is a tiled stream (:mod:`.streaming`), the row tables are vectorised.
        t0 = time.perf_counter()
        torch_in = is_torch(updates)
        G = host_array(updates)
        R, d = G.shape
        ids = None if client_ids is None else [int(c) for c in client_ids]
        gross = np.zeros(0, dtype=np.intp)
        screen_sketch = None  # the gross screen's sketch of the rows, when it made one
        handed = None  # what the screen's pass took for the filter, when the filter reads the rows unchanged
        fast = self._fast_round(R, d)
        if not screened and not self._screen_sketched(G):
            raise ValueError("unscreened rows for a round whose screen is not sketched")
        if self.gross_factor is not None and R > 2:
            # gross outliers, far beyond the honest spread: dropped before they can inflate sigma_0
            # (large rounds: centre and distances on a fresh server-private sketch of the rows, whose pass
            # also checks the input when the caller has not)
            if fast and d > 2 * self.screen_sketch_dim:
                # without node ids (or with neither a memory nor a self-reference) the filter reads these very rows
                plain = ids is None or (self.self_reference is None and self.momentum == 0)
                G, Y, handed = self._screen_sketch(G, screened, self.filter_for(R, d) if plain else None)
            else:
                Y = G
            screen_sketch = Y if Y is not G else None
            centre_rows = Y
            if screen_sketch is not None and R > SCREEN_CENTRE_ROWS:
                centre_rows = Y[np.sort(self._pass_rng.choice(R, size=SCREEN_CENTRE_ROWS, replace=False))]
            dist_med = np.sqrt(row_sq_norms_to(Y, column_median(centre_rows)))
            med_d = median_of(dist_med)
            if med_d > 0:
                gross = np.flatnonzero(dist_med > self.gross_factor * med_d)
        raw = G
        self_info: dict[str, Any] = {}
        step = None  # the step taken since the last call (the evidence's direction)
        if ids is not None and self.evidence is not None:
            step = self._pending_step if self._pending_step is not None else (
                None if self._last_estimate is None else -self._last_estimate)
            if step is not None and step.shape[0] != d:
                step = None
        # the evidence scores each reply's change from its self-reference (its last reply as clipped), taken by the
        # self-reference's pass, and keeps no table of last replies (one pass over the rows and one table fewer)
        refs_evidence = (ids is not None and self.evidence is not None and self.self_reference is not None
                         and self.evidence_from_reference)
        along = None
        if refs_evidence and step is not None:
            norm = float(np.linalg.norm(step))
            along = np.asarray(step, dtype=np.float64) / norm if norm > 0 and np.isfinite(norm) else None
        # fused fast rounds: the rows are clipped into the self-reference's table by the memories' fold, which folds
        # them on the way (the clipping deferred: no buffer of clipped rows, no pass of its own); `in_table` when the
        # self-reference did so
        in_table = False
        if ids is not None and self.self_reference is not None:
            fast_centre = self._fast_centre(R, d, raw.dtype)
            # fused: the clipped rows go into the self-reference's table in the memories' fold's pass (deferred)
            into_table = fast_centre is not None and self.fuse_passes
            if not into_table and (self._scratch is None or self._scratch.shape != raw.shape
                                   or self._scratch.dtype != raw.dtype):
                self._scratch = np.empty_like(raw)  # the clipped rows, rewritten every round (no fresh pages)
            drift_rows, groups = None, 1
            if fast:  # the target's precision from groups of drift_rows when it is larger (drift_groups)
                target, group = max(self.drift_rows, min(R // DRIFT_SHARE, DRIFT_MAX_ROWS)) | 1, self.drift_rows | 1
                groups = drift_groups(target, group)
                drift_rows = group * groups if groups > 1 else target
            V, self_info = self.self_reference.apply(raw, ids, skip=gross, out=None if into_table else self._scratch,
                                                     drift_rows=drift_rows, rng=self._pass_rng, centre=fast_centre,
                                                     change_along=along, into_table=into_table, drift_groups=groups,
                                                     defer=into_table)
            in_table = V is None
            G = raw if in_table else V
        centre_sq = self_info.pop("centre_sq", None)
        suspects = np.zeros(0, dtype=np.intp)
        changes = (self_info.pop("change_rows", []), self_info.pop("change_sq", np.zeros(0)),
                   self_info.pop("change_dots", np.zeros(0)))
        if ids is not None and self.evidence is not None:
            anomalous = np.union1d(gross, self_info.get("jumped", [])).astype(np.intp) if self.skip_anomalies else ()
            if refs_evidence:  # no step (the first round) or a zero one: nothing scored, as observe does
                self.evidence.observe_changes(ids, *changes, skip=anomalous, dim=d)
            else:
                self.evidence.observe(raw, ids, step, skip=anomalous)
            suspects = np.flatnonzero(self.evidence.suspected_rows(ids))
            # memory never excludes more nodes than the assumed Byzantine budget: the most suspect first
            budget = int(np.floor(self.eps_tilde * R))
            if suspects.size > budget:
                z = self.evidence.z_values([ids[r] for r in suspects])
                suspects = np.sort(suspects[np.argsort(z, kind="stable")[:budget]])
        self._pending_step = None
        jumped_out = np.zeros(0, dtype=np.intp)
        if self_info:
            jumped = self_info.get("jumped", [])
            if jumped:
                # left out of the round, within the budget the evidence's suspects also draw on; a jump is
                # this round's evidence and goes first (a mobile adversary's fresh corruptions ahead of
                # nodes whose long-run evidence is merely low), the evidence's suspects take what is left
                budget = int(np.floor(self.eps_tilde * R))
                order = np.argsort(-np.asarray(self_info["jump_ratio"]), kind="stable")
                first = [jumped[k] for k in order][:budget]
                if suspects.size and self.evidence is not None:
                    z = self.evidence.z_values([ids[r] for r in suspects])
                    by_z = [int(r) for r in suspects[np.argsort(z, kind="stable")] if int(r) not in first]
                else:
                    by_z = []
                suspects = np.union1d(np.asarray(first, dtype=np.intp),
                                      np.asarray(by_z[: budget - len(first)], dtype=np.intp)).astype(np.intp)
                jumped_out = np.asarray(first, dtype=np.intp)
        use_memory = ids is not None and self.momentum > 0
        input_clipped = 0
        centre0 = factors0 = None
        if use_memory and self.input_clip_scale is not None and R > 2:
            # Bounded contribution per round: what enters a node's memory is clipped around a robust
            # centre (the last estimate, else the coordinate-wise median), so a mobile adversary cannot
            # plant a huge vector in the memories of the nodes it visits.  Large rounds: the distances in one
            # compiled pass (float64 sums); small ones keep numpy's (the robustness grid's rows, bit for bit).
            centre0 = np.ascontiguousarray(
                self._last_estimate if self._last_estimate is not None and self._last_estimate.shape[0] == d
                else column_median(G), dtype=G.dtype)
            if centre_sq is not None:  # taken by the self-reference pass while it wrote the rows
                dist0 = np.sqrt(centre_sq)
            elif fast:
                from .kernels import centre_sq_distances

                dist0 = np.empty(R)
                centre_sq_distances(G, np.arange(R), centre0, dist0)
                dist0 = np.sqrt(dist0)
            else:
                dist0 = np.sqrt(row_sq_norms_to(G, centre0))
            med0 = median_of(dist0)
            if med0 > 0 and self.far_factor is not None:
                # an obvious outlier is left out of the round, not clipped into it (nor into its memory):
                # the farthest first, within the budget that the jumps and the evidence have left
                room = int(np.floor(self.eps_tilde * R)) - int(np.union1d(suspects, gross).size)
                cand = np.setdiff1d(np.flatnonzero(dist0 > self.far_factor * med0), np.union1d(suspects, gross))
                if room > 0 and cand.size:
                    far = np.sort(cand[np.argsort(-dist0[cand], kind="stable")[:room]])
                    gross = np.union1d(gross, far).astype(np.intp)
            if med0 > 0:
                radius0 = self.input_clip_scale * med0
                scale0 = np.minimum(1.0, radius0 / np.maximum(dist0, 1e-300))
                input_clipped = int(np.sum(scale0 < 1.0))
                factors0 = scale0.astype(G.dtype)
        dups = np.zeros(0, dtype=np.intp)
        if self.duplicate_tol is not None and R > 2:
            # colluding copies of one message get one vote (step 0 of the docstring); not part of the budget
            # (large rounds: on the gross screen's sketch when there is one, else on a sketch of their own)
            cand = _rows_without(R, suspects, gross)
            dup_rows = raw if screen_sketch is None else screen_sketch
            dups = duplicate_rows(dup_rows, cand, self.duplicate_tol,
                                  self._duplicate_rng if projects(cand.size, dup_rows.shape[1]) else None)
        active = _rows_without(R, suspects, gross, dups)
        filt = self.filter_for(active.size, d)
        budget = int(np.floor(self.eps_tilde * R))
        # a budget of 0 (floor(eps R) = 0: a small round) claims nothing, and the rule runs in full
        spent_before_filter = self.spend_budget and budget > 0 and R - dups.size - active.size >= budget
        fold_sketch = None  # (signs, RowSketch) the memories' fold fills for the filter
        if use_memory:
            # the clip and the memories' blend in one pass, into a buffer reused every round; the rows left
            # out of the round enter no memory and are zero in M (the sketched filter reads every row of M)
            # a reply left out of the round (gross, far, a jump, a copy) enters no memory: its node's memory is
            # held, so a mobile adversary leaves nothing behind in the memory of a node it leaves (step 9)
            unfolded = gross if self.fold_dropped else np.union1d(np.union1d(gross, jumped_out), dups).astype(np.intp)
            keep_rows = _rows_without(R, unfolded)
            keep_ids = [ids[r] for r in keep_rows]
            refs = self.self_reference.refs if in_table else None
            # fused fast rounds whose sketched filter will read the memories: the fold's pass also sketches them with
            # that filter's signs (bit for bit what its own pass would take; one pass over the rows fewer)
            if fast and self.fuse_passes and not spent_before_filter and active.size > 1:
                fold_sketch = self._fold_sketch(filt, R, d, G)
            src = None if refs is None else refs.find(keep_ids)
            self_clip = None if refs is None else self._self_clip(keep_rows, src)
            M = self.memory.fold_rows(
                G, keep_rows, keep_ids, out=self._memory_out,
                centre=centre0 if factors0 is not None else None,
                factors=None if factors0 is None else factors0[keep_rows],
                table_view=fast and self.fuse_passes,  # fast rounds: the table's rows themselves when they are a run
                # the clipped rows, clipped into the table in this pass (deferred) or there already; a new node's row
                # (not in the table: -1) from the round's rows
                source=None if refs is None else (refs.rows, src), sketch=fold_sketch, self_clip=self_clip)
            if fold_sketch is not None:
                handed = fold_sketch[1]
            if in_table:
                # the deferred rows the fold did not clip (left out of it), then the jumped nodes' references now
                # follow the drift only
                self.self_reference.finish_clip(keep_rows[src >= 0] if self_clip is not None else ())
                self.self_reference.settle()
            if M.flags.writeable:  # the buffer (not a read-only view of the memory table): kept for the next round
                self._memory_out = M
            if unfolded.size:
                M[unfolded] = 0
                if not self.fold_dropped:
                    self.memory.hold([ids[r] for r in unfolded])
        else:
            M = G
        sigma0_raw = None
        if not spent_before_filter and raw is not G and not use_memory and self.sigma0 is None and filt is self.filter and active.size > 2:
            # sigma_0 from the raw replies: self-clipping shrinks the honest rows' noise, not their
            # heterogeneity, and a sigma_0 estimated on the clipped rows would filter honest minorities
            # (the sketched fast path keeps its own estimate: it never forms the raw Gram matrix)
            sigma0_raw = float(np.sqrt(max(float(estimate_sigma0_sq(centred_gram(raw, rows=active),
                                                                     self.eps_tilde)), 0.0)))
        if spent_before_filter:
            # the gross screen, the jumps and the evidence have left out the assumed Byzantine budget
            # floor(eps R): the rest are taken as honest, and filtering, mixing or clipping them would only
            # cost their minority clients (an honest client with a rare class is far from the others)
            res = AggregationResult(estimate=subset_mean(M, active), kept=np.arange(active.size),
                                    weights=np.full(active.size, 1.0 / max(active.size, 1)), iterations=0,
                                    statistic=0.0, info={"budget_spent": True})
        else:
            # the excluded rows are skipped, not copied out; with mixing the survivors' mean is needed only when the
            # budget is spent (no mixing then): the sketched filter gives it as a downdate of the mean of its own
            # sketching pass (a read of the removed rows), the exact one would need a pass of its own
            sketched = filt.sketch_dim is not None and d > 2 * filt.sketch_dim
            res = filt.aggregate_rows(M, active, sigma0=sigma0_raw, estimate=not self.mixing or sketched,
                                      presketch=handed if M is raw or fold_sketch is not None else None)
        kept = active[np.asarray(res.kept)]
        if res.estimate is None and not kept.size > 2:
            res.estimate = subset_mean(M, kept)  # too few survivors to mix: their mean, as the filter gives it
        centre = None if res.estimate is None else np.asarray(res.estimate)
        new_rows = self_info.pop("new_rows", [])
        if new_rows and self.self_reference is not None:
            # a node seen for the first time whose reply the round did not keep has no trustworthy
            # reference yet: it starts fresh next round instead of being judged against that reply
            kept_set = set(kept.tolist())
            self.self_reference.forget([ids[r] for r in new_rows if r not in kept_set])
            if in_table:  # the rows went into the table: a new node's reference is stored only now, if kept
                adopted = [r for r in new_rows if r in kept_set]
                self.self_reference.adopt([ids[r] for r in adopted], raw[adopted])
        step_trim = 0
        if self.spend_budget and budget > 0 and R - dups.size - kept.size >= budget:
            # the budget is spent (before the filter, or by it): the survivors are taken as honest, and
            # mixing or clipping them would only pull the estimate away from their minority clients
            estimate = centre if centre is not None else subset_mean(M, kept)
            factors, radius = np.ones(kept.size), float("nan")
        elif self.mixing and kept.size > 2:
            # nearest-neighbour mixing of the survivors (Allouah et al. 2023, NNM): each is replaced by
            # the mean of its kept.size - f nearest survivors, shrinking the heterogeneity that a
            # static attacker hides in before the clipping bounds what it can move
            f = min(int(np.floor(self.eps_tilde * kept.size)), (kept.size - 1) // 2)
            estimate, factors, radius = mix_and_clip(M, kept, f, self.clip_scale)
        elif self.clip_scale is not None and kept.size > 1:
            # the Byzantine rows the round may still hold: the budget less what the round left out (copies apart)
            trim = max(budget - (R - dups.size - kept.size), 0) if self.step_trim else 0
            estimate, factors, radius = clip_survivors(M, kept, centre, self.clip_scale, trim=trim, compiled=fast,
                                                       raise_only=self.step_trim == "raise")
            step_trim = trim if kept.size > 2 * trim else 0
        else:
            estimate, factors, radius = centre, np.ones(kept.size), float("nan")
        self._last_estimate = np.array(estimate, copy=True)
        weights = np.zeros(R)
        weights[kept] = factors / max(kept.size, 1)
        out: ArrayLike = estimate
        if torch_in:
            import torch

            out = torch.as_tensor(estimate, device=updates.device).to(updates.dtype)
        else:
            out = estimate.astype(updates.dtype, copy=False)
        info = dict(res.info)
        info.update({
            "gross": [int(r) for r in gross], "duplicates": [int(r) for r in dups], "input_clipped": input_clipped, "memory": bool(use_memory), **self_info,
            "suspected": [int(i) for i in suspects], "clip_radius": float(radius),
            "clipped": int(np.sum(factors < 1.0)), "step_trim": int(step_trim), "defence_seconds": time.perf_counter() - t0,
        })
        return AggregationResult(estimate=out, kept=kept, weights=weights, iterations=res.iterations,
                                 statistic=res.statistic, info=info)
