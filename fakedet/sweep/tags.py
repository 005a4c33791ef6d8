"""MLflow tags that identify a sweep's runs (kept apart from `tracking`, which needs Ray, so readers don't)."""

TAG_SWEEP = "fakedet.sweep"
TAG_KIND = "fakedet.kind"  # "sweep" (parent) or "cell"
TAG_CELL = "fakedet.cell_key"
TAG_TRAJECTORY = "fakedet.trajectory"  # the trajectory's label, `pool1 lr=0.001 seed=11`: cells sharing one training run
TAG_TRIAL = "fakedet.trial"  # the Ray trial that trained the cell
TAG_PARENT = "mlflow.parentRunId"
TAG_NODE = "fakedet.node_id"  # the Ray node that reported a cell run's latest point (nodes of one host share an IP)
TAG_STATUS = "fakedet.status"  # "diverged" for a cell whose training went non-finite, "pruned" for one the scheduler stopped
