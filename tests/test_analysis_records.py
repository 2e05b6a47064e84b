"""Loading record.json sweeps and W&B runs into one table."""

import json

import pytest

from analysis.records import load, load_dir, load_wandb, record_from_wandb
from analysis.synthetic import make_record, make_sweep
from analysis.units import axis_for


@pytest.fixture
def mixed_sweep(tmp_path):
    make_sweep(tmp_path / "sweep", depths=(2, 3, 4, 6), failed=1, running=1)
    other = make_record(3, 20_000, sweep="other", run_name="other-run", run_dir="x")
    (tmp_path / "sweep" / "other").mkdir()
    (tmp_path / "sweep" / "other" / "record.json").write_text(json.dumps(other))
    (tmp_path / "sweep" / "broken").mkdir()
    (tmp_path / "sweep" / "broken" / "record.json").write_text("{not json")
    return tmp_path / "sweep"


def test_load_dir_mixed_statuses_and_filters(mixed_sweep):
    table = load_dir(mixed_sweep)
    assert table.status_counts() == {"complete": 5, "failed": 1, "running": 1}
    assert len(table.skipped) == 1 and "broken" in table.skipped[0][0]
    complete = table.select()
    assert len(complete) == 5 and complete.excluded == {"failed": 1, "running": 1}
    demo = table.select(sweep="scaling_demo")
    assert len(demo) == 4 and demo.excluded["sweep!=scaling_demo"] == 1
    assert len(table.select(status=None)) == 7
    assert len(table.select(status=("running", "failed"), sweep="scaling_demo")) == 2


def test_rows_and_counters_are_filled(mixed_sweep):
    table = load_dir(mixed_sweep).select(sweep="scaling_demo")
    rows = table.rows()
    finals = [r for r in rows if r["final"]]
    assert len(finals) == 4
    for r in finals:
        assert r["annealed"] and r["tokens_seen"] == r["images_seen"] * 680
        assert r["flops:6NL"] > 0 and r["flops:exact"] > 0 and r["L_mean"] > 0
    assert table.conventions() == ["6NL", "exact", "exact_dense_attn"]


def test_missing_final_uses_last_eval_and_nan_is_skipped(tmp_path):
    make_sweep(tmp_path, depths=(2, 3, 4))
    path_a, path_b = sorted(tmp_path.rglob("record.json"))[:2]
    rec = json.loads(path_a.read_text())
    rec["final"] = None
    del rec["evals"][-1]["flops"]  # recomputed from flops_per_image x images
    path_a.write_text(json.dumps(rec))
    rec = json.loads(path_b.read_text())
    rec["final"]["L_mean"] = float("nan")
    path_b.write_text(json.dumps(rec))  # json writes NaN, as Python's json does

    table = load_dir(tmp_path)
    warnings = []
    pts = table.endpoints(axis_for("params_total"), "L_mean", warnings)
    assert len(pts["x"]) == 2
    assert pts["from_last_eval"] == [json.loads(path_a.read_text())["run_name"]]
    assert any("NaN" in w and "1 run(s)" in w for w in warnings) and any("last evaluation" in w for w in warnings)
    run_a = next(r for r in table.runs if r.final is None)
    assert run_a.evals[-1]["flops"]["6NL"] == pytest.approx(
        run_a.flops_per_image["6NL"] * run_a.evals[-1]["images_seen"])


# ---------------------------------------------------------------- W&B with a fake public API


class FakeRun:
    def __init__(self, rec, layout):
        self.id = rec["run_name"].replace("=", "-")
        self.name = rec["run_name"]
        self.group = rec["sweep"]
        self.state = {"complete": "finished", "failed": "crashed", "running": "running"}[rec["status"]]
        static = {k: rec[k] for k in ("model", "flops_per_image", "tokens_per_image", "batch_size")}
        if layout == "flat":  # keys flattened with "/", metrics namespaced, W&B's {"value": v} wrapping
            self.config = {f"{k}/{kk}": {"value": vv} for k, v in static.items() if isinstance(v, dict)
                           for kk, vv in v.items()}
            self.config.update({k: {"value": v} for k, v in static.items() if not isinstance(v, dict)})
            self.summary = {"sweep": rec["sweep"]}
            if rec["final"]:
                self.summary.update({f"final/{k}": v for k, v in rec["final"].items()})
            self._history = [{"_step": e["step"], "trainer/step": e["step"], "images_seen": e["images_seen"],
                              **{f"flops/{c}": v for c, v in e["flops"].items()},
                              **{f"test/{m}": e[m] for m in ("L_mean", "L_last", "err_mean", "err_last")},
                              "annealed": e["annealed"]} for e in rec["evals"]]
            self._history += [{"_step": 1, "train/loss": 9.0}]  # a training row: not an evaluation
        else:  # the whole record mirrored under summary["record"]
            self.config, self.summary, self._history = {}, {"record": rec}, []

    def scan_history(self):
        return iter(self._history)


class FakeApi:
    def __init__(self, runs):
        self._runs = runs
        self.calls = []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        group = (filters or {}).get("group")
        return [r for r in self._runs if group is None or r.group == group]


@pytest.mark.parametrize("layout", ["flat", "record"])
def test_wandb_runs_load_into_the_same_table(tmp_path, layout):
    make_sweep(tmp_path, depths=(2, 3, 4), failed=1)
    recs = [json.loads(p.read_text()) for p in sorted(tmp_path.rglob("record.json"))]
    api = FakeApi([FakeRun(r, layout) for r in recs] + [FakeRun(dict(recs[0], sweep="other"), layout)])
    table = load_wandb("me/var-scaling", group="scaling_demo", api=api)
    assert api.calls == [("me/var-scaling", {"group": "scaling_demo"})]
    assert table.status_counts() == {"complete": 3, "failed": 1}
    from_dir = load_dir(tmp_path).select()
    from_wandb = table.select()
    axis = axis_for("params_total")
    a, b = from_dir.endpoints(axis, "L_mean"), from_wandb.endpoints(axis, "L_mean")
    assert sorted(zip(a["x"], a["y"])) == pytest.approx(sorted(zip(b["x"], b["y"])))
    rows_dir = sorted((r["run"], r["step"], r["L_last"], r["flops:exact"]) for r in from_dir.rows())
    rows_wb = sorted((r["run"], r["step"], r["L_last"], r["flops:exact"]) for r in from_wandb.rows())
    assert rows_dir == rows_wb
    assert all(r.source.startswith("wandb:me/var-scaling/") for r in table.runs)


def test_wandb_source_string_and_bad_runs(tmp_path):
    class Bare:
        id, name, group, state, config, summary = "x", "x", "g", "finished", {}, {}

        def scan_history(self):
            return iter([])

    table = load("wandb:me/proj", group="g", api=FakeApi([Bare()]))
    assert len(table) == 0 and "no model parameter counts" in table.skipped[0][1]
    with pytest.raises(KeyError):
        record_from_wandb(Bare())
