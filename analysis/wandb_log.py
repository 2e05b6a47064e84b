"""Log a finished analysis to W&B as one run in the sweep's group, beside the training runs."""

from __future__ import annotations

from pathlib import Path

from .pipeline import Results
from .report import results_dict


def log_results(res: Results, plots: dict, project: str, group: str | None, entity: str | None = None,
                wandb_module=None) -> str | None:
    """Create a run (job_type "analysis") with the fit table, headline parameters and the plots.

    `wandb_module` is injectable for tests; the real module is imported only here.
    """
    if wandb_module is None:
        import wandb as wandb_module

    data = results_dict(res, plots)
    run = wandb_module.init(project=project, entity=entity, group=group, job_type="analysis",
                            name=f"scaling-fit-{group}" if group else "scaling-fit",
                            config={"options": data["options"], "source": data["source"]})
    columns = ["metric", "kind", "form", "x", "equation", "units", "alpha_or_a", "pearson_r", "r2", "n"]
    rows = []
    for fit in res.fits:
        exponent = fit.params.get("alpha", fit.params.get("a"))
        rows.append([fit.y_name, fit.kind, fit.form, fit.axis.spec, fit.equation(), fit.units_note(), exponent,
                     fit.quality["pearson_r"], fit.quality["r2"], fit.quality["n_points"]])
        prefix = f"fit/{fit.y_name}/{fit.kind}/{fit.axis.spec}/{fit.form}"
        for name, value in fit.params.items():
            run.summary[f"{prefix}/{name}"] = value
        run.summary[f"{prefix}/pearson_r"] = fit.quality["pearson_r"]
    log = {"fits": wandb_module.Table(columns=columns, data=rows)}
    for name, path in plots.items():
        if Path(path).exists():
            log[f"plots/{name}"] = wandb_module.Image(str(path))
    run.log(log)
    run.summary["headline"] = "\n".join(data["headline"])
    run.summary["warnings"] = "\n".join(data["warnings"])
    url = getattr(run, "url", None)
    run.finish()
    return url
