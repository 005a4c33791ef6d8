"""MLflow tags that identify a sweep's runs (kept apart from `tracking`, which needs Ray, so readers don't)."""

TAG_SWEEP = "fakedet.sweep"
TAG_KIND = "fakedet.kind"  # "sweep" (parent) or "cell"
TAG_CELL = "fakedet.cell_key"
TAG_TRIAL = "fakedet.trial"
TAG_PARENT = "mlflow.parentRunId"
