"""Analyses of the paper built on the metrics: checkpoint trajectories (Fig. 6)."""

from dfre.studies.checkpoints import checkpoint_trajectory

__all__ = ["checkpoint_trajectory"]
