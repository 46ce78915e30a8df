"""The learned CIF weight predictors of a CFormer: ``conv`` and ``rnn``.

A :class:`~speechbrain_blspkd.nnet.cformer.CFormer` reads one CIF weight
per frame.  With ``weight_predictor="channel"`` (the paper) it is the last
channel of the layer-normalised pre-layer output; the two predictors here
compute it from all d channels instead:

* ``conv``: two 1-D convolutions (kernel 5, GELU) over the normalised
  frames, about 0.2 s of context each side at 25 frames/s;
* ``rnn``: a bidirectional LSTM over them, so each weight sees the whole
  utterance.

Both end in a linear layer to one logit per frame, whose bias starts at
the CFormer's ``weight_bias_init``.  The modules live on the CFormer as
``predictor`` and ``predictor_out`` (their checkpoint names).
"""

import torch
from torch import nn

__all__ = ["build_weight_predictor", "predict_weights"]


def build_weight_predictor(kind, width, hidden, bias_init):
    """The modules of a ``conv`` or ``rnn`` weight predictor.

    Arguments
    ---------
    kind : str
        ``"conv"`` or ``"rnn"``.
    width : int
        Channels d of the frames.
    hidden : int
        Convolution channels, or LSTM units each way.
    bias_init : float
        Initial bias of the output layer (the weight logit).

    Returns
    -------
    predictor : torch.nn.Module
        The two convolutions (a ``ModuleList``) or the LSTM.
    predictor_out : torch.nn.Linear
        To one logit per frame.

    Example
    -------
    >>> predictor, out = build_weight_predictor("rnn", 8, 4, -2.0)
    >>> out.in_features, float(out.bias)
    (8, -2.0)
    """
    if kind == "conv":
        predictor = nn.ModuleList(
            [
                nn.Conv1d(width, hidden, 5, padding=2),
                nn.Conv1d(hidden, hidden, 5, padding=2),
            ]
        )
        predictor_out = nn.Linear(hidden, 1)
    else:
        predictor = nn.LSTM(width, hidden, batch_first=True, bidirectional=True)
        predictor_out = nn.Linear(2 * hidden, 1)
    with torch.no_grad():
        predictor_out.bias.fill_(bias_init)
    return predictor, predictor_out


def predict_weights(kind, predictor, predictor_out, normed, padding):
    """Weight logits (B, T) of a ``conv`` / ``rnn`` predictor.

    Padding frames are zeroed before the predictor and stay zero between
    the convolutions; the LSTM reads each row's real frames only.

    Arguments
    ---------
    kind : str
        ``"conv"`` or ``"rnn"``.
    predictor, predictor_out : torch.nn.Module
        What :func:`build_weight_predictor` built.
    normed : torch.Tensor
        (B, T, d) layer-normalised frames.
    padding : torch.Tensor
        (B, T) bool, True for padding frames.

    Returns
    -------
    torch.Tensor
        (B, T) logits.

    Example
    -------
    >>> import torch
    >>> modules = build_weight_predictor("conv", 8, 4, 0.0)
    >>> padding = torch.tensor([[False] * 5 + [True] * 2])
    >>> predict_weights("conv", *modules, torch.randn(1, 7, 8), padding).shape
    torch.Size([1, 7])
    """
    inputs = normed.masked_fill(padding[..., None], 0.0)
    if kind == "conv":
        hidden = inputs.transpose(1, 2)
        keep = (~padding)[:, None, :].to(hidden.dtype)
        for conv in predictor:  # padding stays zero between them
            hidden = nn.functional.gelu(conv(hidden)) * keep
        hidden = hidden.transpose(1, 2)
    else:
        lengths = (~padding).sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            inputs, lengths, batch_first=True, enforce_sorted=False
        )
        hidden, _ = predictor(packed)
        hidden, _ = nn.utils.rnn.pad_packed_sequence(
            hidden, batch_first=True, total_length=inputs.shape[1]
        )
    return predictor_out(hidden).squeeze(-1)
