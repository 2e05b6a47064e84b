"""Scaling-law analysis of VAR sweeps: load run records, fit power laws, report.

Modules: records (load record.json / W&B into a table), forms and fitting (the laws and their
optimisation), powerlaw (fits with bootstrap intervals and quality checks), compute (C_min
frontier, iso-FLOP), pipeline (the default analysis), plots, report, wandb_log, synthetic
(record.json sweeps with a known loss surface), cli (`python -m analysis fit SOURCE`).
"""
