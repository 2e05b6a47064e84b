"""`python -m analysis fit` end to end, its failure mode, and logging to a (fake) W&B."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.cli import main, write_outputs
from analysis.pipeline import Options, analyse
from analysis.records import load_dir
from analysis.synthetic import make_sweep
from analysis.wandb_log import log_results


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "scaling_demo"
    make_sweep(root, failed=1, running=1)
    return root


def test_cli_writes_all_outputs(sweep, capsys):
    assert main(["fit", str(sweep), "--bootstrap", "30", "--ci", "0.9"]) == 0
    out_dir = sweep / "analysis"
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"main plot: {out_dir / 'scaling_params_total.png'}"
    headlines = printed[-5:-1]
    assert headlines[0].startswith("L_mean = (") and "[N in 1e6 params]" in headlines[0] and "r=-0.9" in headlines[0]
    assert headlines[2].startswith("L_mean = (") and "[C in PFLOP, 6NL FLOPs]" in headlines[2]
    for name in ("fits.json", "report.md", "scaling_params_total.png", "frontier_6NL.png", "frontier_exact.png",
                 "frontier_exact_dense_attn.png", "residuals.png"):
        assert (out_dir / name).stat().st_size > 0, name
    fits = json.loads((out_dir / "fits.json").read_text())
    assert fits["runs"]["loaded_by_status"] == {"complete": 7, "failed": 1, "running": 1}
    assert fits["runs"]["used"] == 7
    kinds = {(f["kind"], f["form"], f["y"], f["x"]["spec"]) for f in fits["fits"]}
    assert ("endpoint", "floor", "L_last", "params_total") in kinds
    assert ("frontier", "pure", "L_mean", "flops:exact") in kinds
    assert any("joint L_mean(N, D) skipped" in w for w in fits["warnings"])
    pure = next(f for f in fits["fits"] if f["kind"] == "endpoint" and f["form"] == "pure")
    assert set(pure["ci"]) == {"alpha", "beta", "a", "b"} and pure["x"]["unit"] == "1e6 params"
    assert pure["extrapolation"]["points"] and "quality" in pure
    report = (out_dir / "report.md").read_text()
    assert "## Headline laws" in report and "![scaling](scaling_params_total.png)" in report
    assert "Compared with VAR" in report


def test_cli_as_module_with_joint_and_isoflop(tmp_path):
    make_sweep(tmp_path / "iso", depths=(2, 3, 4, 5, 6, 8), budgets=[1e15, 3e15, 1e16], noise=0.002)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "analysis", "fit", str(tmp_path / "iso"), "--bootstrap", "10",
                           "--out", str(out), "--conventions", "6NL", "--y", "L_mean"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"main plot: {out / 'scaling_params_total.png'}"
    assert (out / "joint_N_D.png").exists() and (out / "isoflop_L_mean_6NL.png").exists()
    fits = json.loads((out / "fits.json").read_text())
    joint = next(f for f in fits["fits"] if f["form"] == "joint")
    assert joint["params"]["a"] == pytest.approx(0.30, abs=0.05)
    assert fits["isoflop"] and fits["isoflop"][0]["n_opt_exponent"] > 0


def test_cli_fails_on_source_without_records(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["fit", str(tmp_path / "empty")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no usable records in") and str(tmp_path / "empty") in err[0]
    assert main(["fit", str(tmp_path / "missing")]) != 0


class FakeWandb:
    """The slice of the wandb module that log_results uses."""

    def __init__(self):
        self.init_kwargs = None
        self.logged = {}
        self.finished = False
        self.summary = {}

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, data):
        self.logged.update(data)

    def finish(self):
        self.finished = True

    @staticmethod
    def Table(columns, data):  # noqa: N802 - mirrors wandb.Table
        return {"columns": columns, "data": data}

    @staticmethod
    def Image(path):  # noqa: N802 - mirrors wandb.Image
        return Path(path)


def test_log_to_wandb_as_a_run_in_the_sweep_group(sweep, tmp_path):
    res = analyse(load_dir(sweep), Options(n_boot=10, forms=("pure",), conventions=("6NL",)))
    written = write_outputs(res, tmp_path)
    fake = FakeWandb()
    log_results(res, written, "var-scaling", "scaling_demo", entity="me", wandb_module=fake)
    assert fake.init_kwargs["group"] == "scaling_demo" and fake.init_kwargs["job_type"] == "analysis"
    assert fake.finished and set(fake.logged) >= {"fits", "plots/scaling", "plots/frontier_6NL"}
    assert len(fake.logged["fits"]["data"]) == len(res.fits)
    assert "fit/L_mean/endpoint/params_total/pure/alpha" in fake.summary
    assert "L_mean = (" in fake.summary["headline"]
