"""The speech-adapter interface: encoder frames -> LLM input embeddings.

Every method's adapter (the CIF-based CFormer of BLSP-KD, BLSP's
convolutional subsampler, DiVA's Q-Former...) is a :class:`SpeechAdapter`:
the speech LLM, the objectives, export and evaluation see only this
interface, never a concrete adapter, so a new method is an adapter module
plus an objective module plus a YAML file (``docs/adding_a_method.md``).

The contract
------------
``adapter(feats, lengths=None, targets=None) -> AdapterOutput``

* ``feats`` (B, T, d) encoder frames, ``lengths`` (B,) SpeechBrain relative
  lengths (None: all frames real);
* ``targets`` an optional :class:`AdapterTargets`: what training knows and
  an adapter may use (the transcript token counts that CIF fires, the
  utterance language a gating network is taught with); adapters ignore the
  fields they do not need, and at inference it is None;
* the result holds ``tokens`` (B, N, D) and ``token_mask`` (B, N): row b's
  speech embeddings are ``tokens[b][token_mask[b]]``, spliced into the
  prompt where the transcript would be.  Subclasses of
  :class:`AdapterOutput` add their method's extras (CIF weights, gate
  logits) as typed fields.

Besides ``forward``, an adapter answers:

* :meth:`SpeechAdapter.output_size`: the width D (must equal the LLM's);
* :meth:`SpeechAdapter.export_hparams`: the constructor arguments that
  rebuild it (recorded automatically; override to drop training-only
  options such as an initialisation source), used by the model export;
* :meth:`SpeechAdapter.diagnostics`: per-batch numbers evaluation shows
  (e.g. CIF count accuracy), from an output;
* :meth:`SpeechAdapter.plot`: a figure of one utterance for the
  evaluation report, or None when the adapter has nothing to draw;
* :meth:`SpeechAdapter.language_codes`: the language codes that
  ``targets.language`` indexes, for an adapter that uses the utterance
  language (None, the default: it uses none).  The training loop then maps
  every manifest row's ``language`` to its position in this list
  (:func:`speechbrain_blspkd.dataio.manifest.language_index`, which
  refuses a code the list lacks) and passes
  the indices as ``AdapterTargets.language``;
* :meth:`SpeechAdapter.set_training_progress`: the training loop calls it
  before every training batch with the fraction of the current stage done
  (0 at its first step, approaching 1 at its last), for adapters whose
  behaviour follows a schedule over training (default: ignored).

Authors
 * speechbrain-blspkd contributors 2026
"""

import dataclasses
import functools
import inspect

import torch
from torch import nn

__all__ = [
    "AdapterOutput",
    "AdapterTargets",
    "SpeechAdapter",
]


@dataclasses.dataclass
class AdapterOutput:
    """What every adapter returns.

    Arguments
    ---------
    tokens : torch.Tensor
        (B, N, D) speech embeddings in the LLM input space (anything beyond
        a row's mask is ignored).
    token_mask : torch.Tensor
        (B, N) bool, True for the embeddings that enter the prompt.

    Example
    -------
    >>> out = AdapterOutput(torch.zeros(2, 3, 4),
    ...     torch.tensor([[1, 1, 1], [1, 0, 0]]).bool())
    >>> out.token_counts.tolist()
    [3, 1]
    """

    tokens: torch.Tensor
    token_mask: torch.Tensor

    @property
    def token_counts(self):
        """(B,) long: the number of speech embeddings of each row."""
        return self.token_mask.sum(1)


@dataclasses.dataclass
class AdapterTargets:
    """Training information an adapter may use (all optional).

    Arguments
    ---------
    num_tokens : torch.Tensor, optional
        (B,) transcript lengths in LLM tokens (CIF fires exactly these).
    language : torch.Tensor, optional
        (B,) language indices (a gating network's label).
    token_spans : torch.Tensor, optional
        (B, N, 2) start and end, in seconds, of each transcript token in
        the audio (:mod:`speechbrain_blspkd.dataprep.token_timings`); a
        negative start marks padding.  A CIF adapter learns where tokens
        fire from them.
    """

    num_tokens: torch.Tensor = None
    language: torch.Tensor = None
    token_spans: torch.Tensor = None


class SpeechAdapter(nn.Module):
    """Base class of the speech adapters (see the module notes).

    Subclasses implement ``forward`` and :meth:`output_size`; the arguments
    their constructor was called with are recorded for
    :meth:`export_hparams`.

    Example
    -------
    >>> class Linear(SpeechAdapter):
    ...     def __init__(self, input_size, output_size):
    ...         super().__init__()
    ...         self.proj = nn.Linear(input_size, output_size)
    ...     def output_size(self):
    ...         return self.proj.out_features
    ...     def forward(self, feats, lengths=None, targets=None):
    ...         mask = self.frame_mask(feats, lengths)
    ...         return AdapterOutput(self.proj(feats), mask)
    >>> adapter = Linear(4, 6)
    >>> adapter(torch.randn(2, 5, 4), torch.tensor([1.0, 0.6])).token_counts
    tensor([5, 3])
    >>> adapter.export_hparams()
    {'input_size': 4, 'output_size': 6}
    >>> adapter.output_size()
    6
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        init = cls.__dict__["__init__"]
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            if not hasattr(self, "_constructor_args"):
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                arguments = dict(bound.arguments)
                arguments.pop("self")
                object.__setattr__(self, "_constructor_args", arguments)
            init(self, *args, **kw)

        cls.__init__ = recording_init

    def forward(self, feats, lengths=None, targets=None):
        """Speech embeddings of a batch of encoder frames (the contract).

        Arguments
        ---------
        feats : torch.Tensor
            (B, T, input_size) encoder frames.
        lengths : torch.Tensor, optional
            (B,) SpeechBrain relative lengths (None: all frames real); the
            frames beyond them are padding.
        targets : AdapterTargets, optional
            What training knows (None at inference); an adapter reads the
            fields it needs and ignores the others.

        Returns
        -------
        AdapterOutput
        """
        raise NotImplementedError

    def output_size(self):
        """Width of the speech embeddings (the LLM hidden size)."""
        raise NotImplementedError

    def export_hparams(self):
        """Constructor arguments that rebuild this adapter's structure.

        Returns
        -------
        dict
            Plain values (numbers, strings, lists, None) for the exported
            ``hyperparams.yaml``; the learned weights come from the
            checkpoint.
        """
        return dict(getattr(self, "_constructor_args", {}))

    def diagnostics(self, output, targets=None):
        """Numbers about one batch for evaluation (default: none).

        Arguments
        ---------
        output : AdapterOutput
            This adapter's output on the batch.
        targets : AdapterTargets, optional
            The batch's targets.

        Returns
        -------
        dict
            Name -> float, each a mean over the batch's utterances.
        """
        return {}

    def plot(self, output, index, path, title=None, tokens=None):
        """Draw utterance ``index`` of ``output`` to ``path`` (PNG).

        Returns
        -------
        bool
            False when the adapter has nothing to draw (the default).
        """
        return False

    def language_codes(self):
        """Language codes that ``targets.language`` indexes, or None.

        Returns
        -------
        list of str or None
            Position k is the language of index k (None, the default: the
            adapter uses no language).
        """
        return None

    def set_training_progress(self, fraction):
        """Told before each training batch how far the stage is (a hook).

        The default ignores it; an adapter whose behaviour follows a
        schedule over training (e.g. a teacher-forcing probability)
        overrides it.  Evaluation and inference never call it.

        Arguments
        ---------
        fraction : float
            Optimiser steps of the current stage done, over the stage's
            total, in [0, 1).
        """

    def check_sizes(self, **sizes):
        """Raise ``ValueError`` unless every size is an int >= 1.

        Example
        -------
        >>> SpeechAdapter().check_sizes(input_size=4, num_layers=0)
        Traceback (most recent call last):
        ...
        ValueError: SpeechAdapter: `num_layers` must be an int >= 1, got 0
        """
        for name, value in sizes.items():
            if int(value) != value or value < 1:
                raise ValueError(
                    f"{type(self).__name__}: `{name}` must be an int >= 1, "
                    f"got {value}"
                )

    def check_feats(self, feats):
        """Raise ``ValueError`` unless ``feats`` is (B, T, input_size).

        Example
        -------
        >>> adapter = SpeechAdapter()
        >>> adapter.input_size = 4
        >>> adapter.check_feats(torch.zeros(2, 3, 5))
        Traceback (most recent call last):
        ...
        ValueError: SpeechAdapter: `feats` must be (B, T, 4), got (2, 3, 5)
        """
        if feats.dim() != 3 or feats.shape[-1] != self.input_size:
            raise ValueError(
                f"{type(self).__name__}: `feats` must be (B, T, "
                f"{self.input_size}), got {tuple(feats.shape)}"
            )

    @staticmethod
    def frame_mask(feats, lengths):
        """(B, T) bool mask of the real frames of ``feats``.

        Arguments
        ---------
        feats : torch.Tensor
            (B, T, ...) frames.
        lengths : torch.Tensor or None
            (B,) relative lengths (None: all real).

        Returns
        -------
        torch.Tensor
        """
        from speechbrain.dataio.dataio import length_to_mask

        batch, frames = feats.shape[:2]
        if lengths is None:
            return torch.ones(
                batch, frames, dtype=torch.bool, device=feats.device
            )
        absolute = torch.round(lengths.to(feats.device).float() * frames)
        return length_to_mask(
            absolute.clamp(min=1), max_len=frames, device=feats.device
        ).bool()
