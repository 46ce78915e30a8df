"""``blspkd-demo-ui``: talk to exported speech LLMs in the browser.

The page (:mod:`~speechbrain_blspkd.inference.demo_ui.page`) asks what it
shows of a :class:`DemoBackend`
(:mod:`~speechbrain_blspkd.inference.demo_ui.backend`), which streams the
answers (:mod:`~speechbrain_blspkd.inference.demo_ui.streaming`) and draws
what the CIF did (:mod:`~speechbrain_blspkd.inference.demo_ui.cif`);
:mod:`~speechbrain_blspkd.inference.demo_ui.cli` is the command.
"""

from speechbrain_blspkd.inference.demo_ui.backend import (
    DemoBackend,
    DemoInputError,
)
from speechbrain_blspkd.inference.demo_ui.cli import build_parser, main
from speechbrain_blspkd.inference.demo_ui.page import build_app
from speechbrain_blspkd.inference.demo_ui.streaming import TokenStreamer
from speechbrain_blspkd.utils.plotting import plot_cif_over_waveform

__all__ = [
    "DemoBackend",
    "DemoInputError",
    "TokenStreamer",
    "build_app",
    "build_parser",
    "main",
    "plot_cif_over_waveform",
]
