"""Smoke tests of the benchmarks: the in-process grid, robustness, mean estimation and decode time.

Tiny configurations (seconds); the CLIs' own ``--quick`` sizes are marked slow.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from benchmarks import decode_time, mean_estimation, robustness
from benchmarks.inprocess import GradientToModel, InProcessGrid, run_app


def _train_message(x: np.ndarray, node: int = 7) -> Message:
    msg = Message(RecordDict({"arrays": ArrayRecord({"w": Array(x)}), "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=node, message_type=MessageType.TRAIN, group_id="1")
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg


def test_gradient_to_model_takes_one_sgd_step_and_drops_erasures():
    x = np.arange(4, dtype=np.float32)
    sent = _train_message(x)
    g = np.array([1.0, -2.0, 0.5, 0.0], dtype=np.float32)
    reply = Message(RecordDict({"gradient": ArrayRecord({"w": Array(g)}),
                                "metrics": MetricRecord({"num-examples": 32})}), reply_to=sent)
    out = GradientToModel(0.5)(sent, reply)
    np.testing.assert_allclose(out.content["arrays"]["w"].numpy(), x - 0.5 * g)
    assert out.content["metrics"]["num-examples"] == 32
    assert out.metadata.reply_to_message_id == "m1"
    erased = Message(RecordDict({"metrics": MetricRecord({"server-round": 1})}), reply_to=sent)
    assert GradientToModel(0.5)(sent, erased) is None


def test_inprocess_grid_runs_the_real_client_app(tmp_path):
    overrides = {"num-server-rounds": 2, "num-malicious": 1, "attack": "scaled-negative", "dirichlet-alpha": 1.0,
                 "output-dir": str(tmp_path), "seed": 3}
    first = run_app(overrides, 6)
    again = run_app(overrides, 6)
    assert first["num_nodes"] == 6 and len(first["malicious_partitions"]) == 1
    assert set(first["central"]) == {"0", "1", "2"}
    assert first["final_accuracy"] == again["final_accuracy"]  # seeded: deterministic
    assert list(tmp_path.glob("*.json"))


def test_inprocess_grid_turns_client_exceptions_into_error_replies():
    def broken(msg, context):
        raise RuntimeError("boom")

    grid = InProcessGrid(broken, 2, {})
    node = list(grid.get_node_ids())[0]
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                  message_type=MessageType.TRAIN, group_id="1")
    (reply,) = grid.send_and_receive([msg])
    assert reply.has_error() and "boom" in reply.error.reason
    assert int(reply.metadata.src_node_id) == node


def _tiny_robustness(out, *extra):
    return robustness.main(["--models", "logreg", "--alphas", "0.3", "--seeds", "0", "--rounds", "3",
                            "--rules", "rge", "cclip", "wm:cclip", "--attacks", "sign-flip", "memory-aware", "omni-rotate:alie",
                            "--ablation-attacks", "sleeper", "--out", str(out), "--no-progress", *extra])


def test_robustness_tiny_grid_outputs_and_resume(tmp_path):
    assert _tiny_robustness(tmp_path) == 0
    recs = [json.loads(line) for line in (tmp_path / "robustness.jsonl").read_text().splitlines()]
    assert not [r for r in recs if r.get("error")], [r.get("traceback") for r in recs if r.get("error")]
    rules = {r["rule"] for r in recs}
    assert {"oracle", "clean-fedavg", "rge", "cclip", "wm:cclip"} <= rules
    assert {r for r in rules if r.startswith("rge/")} == set(robustness.ABLATIONS)
    for r in recs:
        assert 0.0 <= r["final_accuracy"] <= 1.0
        assert 0.0 <= r["honest_excluded_rate"] <= 1.0
    summary = json.loads((tmp_path / "robustness.json").read_text())["summary"]
    (setting,) = summary
    t = summary[setting]["targets"]
    assert {"worst_minus_oracle", "above_every_peer", "clean_honest_excluded"} <= set(t)
    md = (tmp_path / "robustness.md").read_text()
    assert "| **rge** |" in md and "omni-rotate:alie" in md
    assert (tmp_path / "robustness_worst.png").stat().st_size > 0
    # resumable: a rerun runs nothing new
    n = len(recs)
    assert _tiny_robustness(tmp_path) == 0
    assert len((tmp_path / "robustness.jsonl").read_text().splitlines()) == n


def test_robustness_other_federation_sizes_run_in_their_own_folder(tmp_path, monkeypatch):
    # 5 of 20 Byzantine (eps = 0.25): every run has those sizes, the tables say so, and a folder holding runs of
    # another size is refused before anything runs (the tables would average the two)
    args = ["--models", "logreg", "--alphas", "0.3", "--seeds", "0", "--rounds", "2", "--rules", "rge", "cclip",
            "--attacks", "sign-flip", "--no-ablation", "--no-progress", "--num-nodes", "20", "--num-malicious", "5"]
    assert robustness.main([*args, "--out", str(tmp_path)]) == 0
    recs = [json.loads(line) for line in (tmp_path / "robustness.jsonl").read_text().splitlines()]
    assert recs and {(r["num_nodes"], r["num_malicious"]) for r in recs} == {(20, 5)}
    assert not [r for r in recs if r.get("error")]
    assert "R = 20 clients, 5 of them Byzantine (eps = 0.25)" in (tmp_path / "robustness.md").read_text()
    with pytest.raises(SystemExit):
        robustness.main([*args[:-4], "--out", str(tmp_path)])  # the grid's 20 / 4 into the 20 / 5 folder
    with pytest.raises(SystemExit):
        robustness.main([*args[:-2], "--num-malicious", "10", "--out", str(tmp_path / "half")])  # not < R / 2
    # without --out, other sizes get their own folder next to the grid's results
    seen = {}
    monkeypatch.setattr(robustness, "run_grid", lambda specs, out, **kw: seen.setdefault("out", out) and 0)
    monkeypatch.setattr(robustness, "report", lambda out, command, mode="gradient": {})
    assert robustness.main(args) == 0
    assert seen["out"] == robustness.DEFAULT_OUT / "robustness_R20_f5"
    spec = robustness.build_grid(models=("logreg",), alphas=(0.3,), seeds=(0,), attacks=("alie",), rules=("rge",),
                                 num_nodes=40, num_malicious=10)
    assert {(s.num_nodes, s.num_malicious) for s in spec} == {(40, 10)}


def test_robustness_rule_builder_names():
    for name in (*robustness.RULES, *robustness.ABLATIONS):
        agg, cfg_name = robustness.build_rule(name, 20, 4)
        assert callable(agg.aggregate)
        assert cfg_name in ("mean",) or cfg_name.split(":")[-1] in name
    with pytest.raises(ValueError):
        robustness.build_rule("rge/no-such-part", 20, 4)
    # worker momentum variants: the ablation's 0.9, any other beta by name
    assert robustness.build_rule("rge/momentum", 20, 4)[0].momentum == 0.9
    assert robustness.build_rule("rge/momentum-0.5", 20, 4)[0].momentum == 0.5
    assert robustness.build_rule("rge", 20, 4)[0].momentum == 0.7  # the default
    assert robustness.build_rule("rge/no-momentum", 20, 4)[0].momentum == 0.0
    assert robustness.build_rule("rge/mixing", 20, 4)[0].mixing and not robustness.build_rule("rge", 20, 4)[0].mixing
    assert robustness.build_rule("rge/evidence-floor-0.1", 20, 4)[0].evidence.q_floor == 0.1
    assert robustness.build_rule("rge", 20, 4)[0].evidence.q_floor == 0.003  # the default
    assert robustness.build_rule("rge/fold-dropped", 20, 4)[0].fold_dropped
    assert robustness.build_rule("rge", 20, 4)[0].step_trim and not robustness.build_rule("rge/no-step-trim", 20, 4)[0].step_trim
    assert not robustness.build_rule("rge", 20, 4)[0].fold_dropped
    assert robustness.build_rule("rge", 20, 4)[0].self_reference.own_scale  # the default: jumps on the node's own scale
    assert not robustness.build_rule("rge/jump-median", 20, 4)[0].self_reference.own_scale


def test_mean_estimation_tiny(tmp_path):
    assert mean_estimation.main(["--dims", "50", "200", "--num-nodes", "20", "--trials", "1", "--rules", "rge",
                                 "rge-paper", "mean", "median", "--out", str(tmp_path), "--no-progress"]) == 0
    payload = json.loads((tmp_path / "mean_estimation.json").read_text())
    assert set(payload["summary"]) == set(mean_estimation.ATTACKS)
    for by_rule in payload["summary"].values():
        for s in by_rule.values():
            assert len(s["median_error"]) == 2
            # the slope is fitted on the non-exact points only: nan when the rule recovers the mean exactly
            assert np.isfinite(s["slope"]) or sum(s["exact"]) >= 1
    # the mean is moved by every attack; RGE removes far Gaussian outliers exactly
    # Algorithm 3 removes far Gaussian outliers exactly; the default defence (which also clips the
    # survivors, a bounded bias) lands close to the honest mean, far from the attacked mean
    assert payload["summary"]["gaussian-far"]["rge-paper"]["median_error"][1] < 1e-6
    far = payload["summary"]["gaussian-far"]
    # the default mixes its survivors (NNM: means of n - f neighbours), which costs a little of the
    # sample mean's efficiency on clean Gaussian rows; still > 10x below the mean's error
    assert far["rge"]["median_error"][1] < 0.1 * far["mean"]["median_error"][1]
    assert payload["summary"]["gaussian-far"]["mean"]["median_error"][1] > 1.0
    assert "slope" in (tmp_path / "mean_estimation.md").read_text()
    assert (tmp_path / "mean_estimation.png").stat().st_size > 0


def test_decode_time_tiny(tmp_path):
    assert decode_time.main(["--quick", "--sections", "grid", "--rules", "rge", "median", "bulyan",
                             "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "decode_time.json").read_text())
    cases = payload["sections"]["grid"]
    assert [(c["R"], c["d"]) for c in cases] == [(12, 1000), (12, 10_000), (20, 1000), (20, 10_000)]
    for case in cases:
        assert case["np_mean_seconds"] > 0
        assert set(case["rules"]) == {"mean", "rge", "median", "bulyan"}
        for name, row in case["rules"].items():
            assert row["ratio"] > 0, name
        assert case["rules"]["median"]["vs_best_numpy"] > 0
    assert "| rge |" in (tmp_path / "decode_time.md").read_text()
    assert (tmp_path / "decode_time.png").stat().st_size > 0


def test_decode_time_best_numpy_formulations_agree_with_the_rules():
    """The 'best numpy formulation' references compute the same estimate as our rules."""
    from flwr_byzantine.aggregators import build_for_federation

    G, f = decode_time.make_round(20, 300, 0.2, 0)
    for name in ("median", "trimmed-mean", "krum", "multi-krum", "bulyan"):
        ref = decode_time.best_numpy(name, G, f)()
        ours = build_for_federation(name, 20, 0.2).aggregate(G).estimate
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_cli_quick_configurations(tmp_path):
    assert robustness.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert mean_estimation.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert decode_time.main(["--quick", "--out", str(tmp_path)]) == 0
    for name in ("robustness.jsonl", "robustness.md", "robustness_worst.png", "mean_estimation.json",
                 "mean_estimation.png", "decode_time.json", "decode_time.png"):
        assert (tmp_path / name).exists(), name


def test_robustness_local_mode_own_files_keys_and_comparison(tmp_path):
    """--mode local: its own JSONL (gradient rows untouched and keyed as before), the mode-comparison table."""
    common = ["--models", "logreg", "--alphas", "0.3", "--seeds", "0", "--rounds", "3", "--rules", "rge",
              "--attacks", "sign-flip", "--no-ablation", "--out", str(tmp_path), "--no-progress"]
    assert robustness.main(common) == 0
    grad_lines = (tmp_path / "robustness.jsonl").read_text()
    assert robustness.main([*common, "--mode", "local"]) == 0
    assert (tmp_path / "robustness.jsonl").read_text() == grad_lines  # gradient file untouched
    grad = [json.loads(line) for line in grad_lines.splitlines()]
    local = [json.loads(line) for line in (tmp_path / "robustness_local.jsonl").read_text().splitlines()]
    assert not [r for r in local if r.get("error")], [r.get("traceback") for r in local if r.get("error")]
    assert {r["rule"] for r in local} == {"oracle", "clean-fedavg", "rge"} and len(local) == len(grad)
    assert all("mode" not in r and "|mode=" not in r["key"] for r in grad)  # the keys of the existing grid
    d = robustness.local_defaults()
    assert all(r["mode"] == "local" and r["client_lr"] == d["client_lr"] and r["learning_rate"] == d["server_lr"]
               and r["key"].endswith(f"|mode=local|E={d['local_epochs']}|S={d['local_steps']}|clr={d['client_lr']:g}")
               for r in local)
    assert {(r["rule"], r["attack"], r["seed"]) for r in local} == {(r["rule"], r["attack"], r["seed"]) for r in grad}
    comp = json.loads((tmp_path / "robustness_local.json").read_text())["local_vs_gradient"]["logreg, alpha=0.3"]
    cell = comp["rules"]["rge"]["attacks"]["sign-flip"]
    by_mode = {m: next(100 * r["final_accuracy"] for r in recs if r["rule"] == "rge" and r["attack"] == "sign-flip")
               for m, recs in (("gradient", grad), ("local", local))}
    assert cell["gradient"] == pytest.approx(by_mode["gradient"]) and cell["local"] == pytest.approx(by_mode["local"])
    md = (tmp_path / "robustness_local.md").read_text()
    assert "## Local-training mode next to gradient mode" in md and "| **rge** |" in md
    assert (tmp_path / "robustness_local_worst.png").stat().st_size > 0
    n = len(local)  # resumable in its own file
    assert robustness.main([*common, "--mode", "local"]) == 0
    assert len((tmp_path / "robustness_local.jsonl").read_text().splitlines()) == n


def test_robustness_local_rules_drop_the_gradient_evidence():
    """Local mode builds the default defence as server_app.build_aggregator does (no evidence) unless asked."""
    from flwr_byzantine.config import RunConfig
    from server_app.server_app import build_aggregator

    agg, name = robustness.build_rule("rge", 20, 4, mode="local")
    assert name == "rge" and agg.evidence is None
    assert build_aggregator(RunConfig.from_mapping({"client-mode": "local"}), 20).evidence is None
    assert robustness.build_rule("rge", 20, 4)[0].evidence is not None
    assert robustness.build_rule("rge/evidence", 20, 4, mode="local")[0].evidence is not None


def test_decode_time_defence_section_tiny(tmp_path):
    assert decode_time.main(["--quick", "--sections", "defence", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "decode_time.json").read_text())["sections"]["defence"]
    assert [(r["R"], r["d"]) for r in rows] == decode_time.DEFENCE_SIZES[0]
    for r in rows:
        assert r["defence"]["ratio"] > 0 and r["filter"]["ratio"] > 0 and r["byzantine_kept"] == 0
        assert r["clean"]["ratio"] > 0 and len(r["clean"]["all_seconds"]) >= 5 and r["clean_honest_dropped"] == 0
    md = (tmp_path / "decode_time.md").read_text()
    assert "default defence with node ids" in md and "| clean rounds: defence |" in md
    assert (tmp_path / "decode_time_defence.png").stat().st_size > 0


@pytest.mark.slow
def test_first_use_compiles_into_an_empty_cache_and_loads_from_it(tmp_path):
    """Two fresh processes on one empty cache directory: the first compiles the kernels, the second loads every one
    of them from the cache and compiles none; both decode the App's round and the large rounds alike, the attackers
    out."""
    from benchmarks import first_use

    assert first_use.main(["--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "first_use.json").read_text())
    (row,) = res["rows"]
    cold, warm = row["cold"], row["warm"]
    assert cold["app_kept"] == warm["app_kept"] == 16
    assert cold["large_attackers_removed"] and warm["large_attackers_removed"]
    assert cold["signatures_compiled"] > 10 and cold["signatures_loaded"] == 0
    # the warm process loads the entry points only: their callees' code is inside theirs
    assert warm["signatures_compiled"] == 0 and 0 < warm["signatures_loaded"] <= cold["signatures_compiled"]
    assert all(row[p][k] > 0 for p in ("cold", "warm") for k in ("app_seconds", "large_seconds", "process_seconds"))
    assert (tmp_path / "first_use.png").stat().st_size > 0


@pytest.mark.slow
def test_defence_before_after_tiny(tmp_path):
    from benchmarks import defence_before_after

    assert defence_before_after.main(["--quick", "--repeats", "5", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "defence_before_after.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["before"]["seconds"] > 0 and r["after"]["seconds"] > 0 for r in rows)


@pytest.mark.slow
def test_defence_before_after_digits(tmp_path):
    from benchmarks import defence_before_after

    assert defence_before_after.main(["--digits", "--no-ids", "--quick", "--ref", "HEAD", "--repeats", "5",
                                      "--out", str(tmp_path), "--name", "digits"]) == 0
    row = json.loads((tmp_path / "digits.json").read_text())["rows"][0]
    assert (row["R"], row["d"], row["rounds"]) == (20, 650, 2) and not row["node_ids"]
    assert row["before"]["seconds"] > 0 and row["after"]["seconds"] > 0
    assert 0 <= row["same_kept_rounds"] <= 2 and len(row["after"]["per_round_seconds"]) == 2


def test_defence_passes_tiny(tmp_path):
    from benchmarks import defence_passes

    assert defence_passes.main(["--sizes", "20,3000", "--calls", "2", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "defence_passes.json").read_text())["rows"][0]
    assert row["defence_ratio"] > 0 and row["passes"]["filter (sketch or Gram, solver)"] > 0
    assert "self-reference: clipping" in row["passes"]


def test_defence_floor_tiny(tmp_path):
    from benchmarks import defence_floor

    rng = np.random.default_rng(0)
    G, T, M = (rng.standard_normal((3, 50), dtype=np.float32) for _ in range(3))
    u, v, w = (rng.standard_normal(50, dtype=np.float32) for _ in range(3))
    s = np.where(rng.random(50) < 0.5, -1, 1).astype(np.int8)
    out = np.empty(3, dtype=np.float32)
    defence_floor.read_rows(G, out)
    np.testing.assert_allclose(out, G.sum(axis=1), rtol=1e-5)
    defence_floor.read_two(G, T, out)
    np.testing.assert_allclose(out, (G - T).sum(axis=1), rtol=1e-4, atol=1e-5)
    defence_floor.read_two_vectors(G, T, u, v, w, out)
    np.testing.assert_allclose(out, (((G - T) - u) * v + w).sum(axis=1), rtol=1e-4, atol=1e-4)
    T0, M0 = T.copy(), M.copy()
    defence_floor.update_two(G, T, M)  # the bytes of the clipping and the fold in one pass
    np.testing.assert_allclose(T, T0 + np.float32(0.5) * G, rtol=1e-6)
    np.testing.assert_allclose(M, np.float32(0.7) * M0 + np.float32(0.3) * T, rtol=1e-6, atol=1e-7)
    T0, M0 = T.copy(), M.copy()
    defence_floor.update_two_vectors(G, T, M, u, v, s, out)  # and the vectors every row of the fold reads
    np.testing.assert_allclose(T, T0 + np.float32(0.5) * (G - u), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(M, np.float32(0.7) * M0 + np.float32(0.3) * (T - v), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, (s * T).sum(axis=1), rtol=1e-4, atol=1e-4)
    assert defence_floor.main(["--sizes", "20,3000", "--repeats", "3", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "defence_floor.json").read_text())["rows"][0]
    passes = list(row["passes"].values())
    assert len(passes) == 6 and all(v > 0 for v in passes)
    assert row["passes_floor"] == pytest.approx(sum(passes[:4]))
    assert row["fused_floor"] == pytest.approx(passes[1] + passes[2])
    assert row["vectors_floor"] == pytest.approx(passes[0] + passes[4] + passes[5] + passes[3])


def test_local_mode_default_is_the_apps_local_default():
    """The local-mode grid measures the defence the App builds for model updates (MODEL_UPDATE_OPTIONS)."""
    from flwr_byzantine.config import RunConfig
    from server_app.server_app import build_aggregator

    bench, _ = robustness.build_rule("rge", 20, 4, mode="local")
    app = build_aggregator(RunConfig.from_mapping({"client-mode": "local", "num-malicious": 4}), 20)
    for attr in ("evidence", "self_reference", "mixing", "clip_scale", "gross_factor"):  # eps: the true f here
        assert (getattr(bench, attr) is None) == (getattr(app, attr) is None), attr
        if not hasattr(getattr(bench, attr), "__dict__"):
            assert getattr(bench, attr) == getattr(app, attr), attr
    assert bench.evidence is None and bench.self_reference is None and not bench.mixing
    ev, _ = robustness.build_rule("rge/evidence", 20, 4, mode="local")
    assert ev.evidence is not None and ev.self_reference is None and not ev.mixing



def test_fast_passes_agreement_tiny(tmp_path):
    from benchmarks import fast_passes_agreement

    assert fast_passes_agreement.main(["--attacks", "alie", "--alphas", "1.0", "--rounds", "4", "--sketch-dims", "128",
                                       "--drift-rows", "9", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "fast_passes_agreement.json").read_text())
    run = payload["runs"][0]["128/9"]
    assert run["rounds"] == 4 and 0 <= run["kept_agree"] <= 4 and run["gross_agree"] <= 4
    assert 0.0 <= payload["summary"]["128/9"]["kept_identical_fraction"] <= 1.0
    assert (tmp_path / "fast_passes_agreement.png").exists()
