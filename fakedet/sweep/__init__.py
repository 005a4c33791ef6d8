"""Sweeps on Ray Tune, Optuna and MLflow: `python sweeps/run.py ablation|hpo|cutoff`."""
