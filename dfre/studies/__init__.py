"""Analyses of the paper built on the metrics: checkpoint trajectories (Fig. 6) and whole
studies described in a TOML file (``dfre run``)."""

from dfre.studies.checkpoints import checkpoint_trajectory
from dfre.studies.config import Study, load_study, run_study

__all__ = ["Study", "checkpoint_trajectory", "load_study", "run_study"]
