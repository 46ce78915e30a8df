"""Training objectives, one module per method (see :mod:`.base`)."""

from speechbrain_blspkd.objectives.aura import AuRAObjective
from speechbrain_blspkd.objectives.base import Objective
from speechbrain_blspkd.objectives.blsp import BLSPObjective
from speechbrain_blspkd.objectives.blsp_kd import BLSPKDObjective
from speechbrain_blspkd.objectives.diva import DiVAObjective
from speechbrain_blspkd.objectives.lad import LADObjective

__all__ = [
    "AuRAObjective",
    "BLSPKDObjective",
    "BLSPObjective",
    "DiVAObjective",
    "LADObjective",
    "Objective",
]
