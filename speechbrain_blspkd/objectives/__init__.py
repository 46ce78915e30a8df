"""Training objectives, one module per method (see :mod:`.base`)."""

from speechbrain_blspkd.objectives.base import Objective
from speechbrain_blspkd.objectives.blsp_kd import BLSPKDObjective

__all__ = ["BLSPKDObjective", "Objective"]
