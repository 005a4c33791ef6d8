"""Run a sweep: `python sweeps/run.py ablation|hpo|cutoff [--smoke] ...` (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fakedet.sweep_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
