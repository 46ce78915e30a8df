"""Diagnostic plots: CIF weights over time (alone, or under the waveform
with the fired tokens, as the browser demo shows them) and training curves.

matplotlib is imported lazily, and only its object-oriented API with the
Agg canvas is used (never ``pyplot``), so importing this module is cheap and
plotting never changes the caller's matplotlib backend or global state.
Every PNG is written atomically.
"""

import logging
import pathlib

from speechbrain_blspkd.utils.atomic import atomic_path, read_jsonl

logger = logging.getLogger(__name__)

_SPLITS = ("train", "valid", "test")


def _new_figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path):
    path = pathlib.Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _to_float_list(values, what):
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().reshape(-1).tolist()
    elif hasattr(values, "tolist"):
        values = values.tolist()
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: expected a 1-D sequence of numbers") from err


#: Legend label and colour of the token-timing marks (:func:`mark_token_timings`).
TIMING_LABEL = "Whisper timings (transcript)"
TIMING_COLOR = "tab:green"


def _timing_starts(token_timings):
    """Start seconds of ``(N, 2)`` timings (a tensor, array or pairs)."""
    if hasattr(token_timings, "detach"):
        token_timings = token_timings.detach().float().cpu().tolist()
    elif hasattr(token_timings, "tolist"):
        token_timings = token_timings.tolist()
    starts = []
    for k, span in enumerate(token_timings):
        try:
            start, end = span
            starts.append(float(start))
            float(end)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"token_timings: item {k} is not a (start, end) pair of "
                f"seconds: {span!r}"
            ) from err
    return starts


def mark_token_timings(axes, token_timings, labels=None, label_ax=None):
    """Thin vertical lines at the start of each timed token.

    The marks of :func:`plot_cif_weights` and of the browser demo's CIF
    plot: where Whisper places each LLM token of the transcript
    (:mod:`speechbrain_blspkd.dataprep.token_timings`), to be read against
    where the CIF fired.  Only the first line carries the legend label
    :data:`TIMING_LABEL`.

    Arguments
    ---------
    axes : matplotlib Axes or list of Axes
        Where the lines are drawn (each gets every line).
    token_timings : torch.Tensor or sequence of (float, float)
        ``(N, 2)`` (start, end) seconds of each token.
    labels : sequence of str, optional
        A label per token, written beside its line on ``label_ax``.
    label_ax : matplotlib Axes, optional
        The axes of the labels (default: the first of ``axes``); they stand
        near its top, in the timing colour.

    Returns
    -------
    list
        The lines drawn on the first of ``axes`` (one per token).
    """
    if not isinstance(axes, list | tuple):
        axes = [axes]
    starts = _timing_starts(token_timings)
    label_ax = label_ax if label_ax is not None else axes[0]
    first = []
    for k, x in enumerate(starts):
        for i, ax in enumerate(axes):
            line = ax.axvline(
                x,
                color=TIMING_COLOR,
                linewidth=0.7,
                linestyle="-",
                alpha=0.85,
                label=TIMING_LABEL if k == 0 else "_nolegend_",
            )
            if i == 0:
                first.append(line)
        if labels is not None and k < len(labels):
            label_ax.text(
                x,
                0.97,
                str(labels[k]),
                transform=label_ax.get_xaxis_transform(),
                rotation=60,
                fontsize=7,
                ha="left",
                va="top",
                color=TIMING_COLOR,
            )
    return first


def _mark_fired_tokens(axes, seconds, labels, label_y, fontsize):
    """Dashed red lines where tokens fired, across every axes, each labelled
    on the first of ``axes`` at height ``label_y`` with its token ("?"
    past the labels); only the first line carries the legend label
    "CIF fired"."""
    for k, x in enumerate(seconds):
        for ax in axes:
            ax.axvline(
                x,
                color="tab:red",
                linewidth=0.8,
                linestyle="--",
                label="CIF fired" if k == 0 else "_nolegend_",
            )
        axes[0].text(
            x,
            label_y,
            labels[k] if k < len(labels) else "?",
            rotation=60,
            fontsize=fontsize,
            ha="left",
            va="bottom",
            color="tab:red",
        )


def plot_cif_weights(
    alphas,
    fire_frames,
    token_strings,
    path,
    frame_rate=50,
    title=None,
    token_timings=None,
):
    """PNG of the CIF weights of one utterance with the firing points.

    Bars show alpha per frame, a line the cumulative sum (right axis), and a
    vertical marker labelled with the transcript token stands at each frame
    where a token fired.  With ``token_timings``, a thin line in another
    colour also stands where each token starts by those timings (legend
    "Whisper timings (transcript)"), so that firings can be compared with
    where the tokens are.

    Arguments
    ---------
    alphas : torch.Tensor or sequence of float
        (T,) CIF weights (padding already removed).
    fire_frames : sequence of int
        Frame of each fired token (e.g.
        :func:`speechbrain_blspkd.nnet.cif.fire_positions`).
    token_strings : sequence of str
        Transcript tokens, in order (labels of the markers).  Extra tokens
        without a firing, or firings without a token ("?"), are noted in
        the title.
    path : str or pathlib.Path
        Destination PNG.
    frame_rate : float
        Encoder frames per second (x axis in seconds).
    title : str, optional
        Figure title.
    token_timings : torch.Tensor or sequence of (float, float), optional
        ``(N, 2)`` (start, end) seconds of the transcript's tokens (e.g.
        :func:`speechbrain_blspkd.nnet.token_alignment.utterance_timings`);
        None (default) draws no timing marks.

    Returns
    -------
    pathlib.Path
        ``path``.

    Example
    -------
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "cif.png"
    >>> _ = plot_cif_weights([0.5, 0.6, 0.9, 0.0], [1, 2], ["hi", "yo"], out,
    ...     token_timings=[(0.0, 0.03), (0.03, 0.08)])
    >>> out.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
    """
    alphas = _to_float_list(alphas, "plot_cif_weights (alphas)")
    if not alphas:
        raise ValueError("plot_cif_weights: alphas are empty")
    if frame_rate <= 0:
        raise ValueError(f"plot_cif_weights: bad frame_rate {frame_rate}")
    fire_frames = [int(f) for f in _to_float_list(fire_frames, "fire_frames")]
    tokens = [str(t) for t in token_strings]

    times = [t / frame_rate for t in range(len(alphas))]
    cumsum, total = [], 0.0
    for a in alphas:
        total += a
        cumsum.append(total)

    fig = _new_figure(max(6.0, min(24.0, len(alphas) / 12.0)), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(times, alphas, width=1.0 / frame_rate, color="tab:blue", alpha=0.6)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("alpha")
    ax2 = ax.twinx()
    ax2.plot(times, cumsum, color="tab:gray", linewidth=1.0)
    ax2.set_ylabel("cumulative alpha")
    top = max(max(alphas), 1e-6)
    fired = [frame / frame_rate for frame in fire_frames]
    _mark_fired_tokens([ax], fired, tokens, top * 1.02, fontsize=7)
    ax.set_ylim(0, top * 1.35)
    if token_timings is not None:
        timed = mark_token_timings(ax, token_timings)
        if timed:
            handles, names = ax.get_legend_handles_labels()
            # on the twin axes, which are drawn above the bars' axes
            ax2.legend(handles, names, loc="upper right", fontsize=7)
    notes = [f"{len(fire_frames)} fired / {len(tokens)} tokens"]
    notes.append(f"sum alpha {total:.2f}")
    fig.suptitle(((title + " - ") if title else "") + ", ".join(notes))
    fig.tight_layout()
    return _save_png(fig, path)


def plot_cif_over_waveform(
    wav,
    sample_rate,
    alphas,
    fires,
    labels,
    frame_rate,
    path,
    title=None,
    token_timings=None,
    timing_labels=None,
):
    """PNG: the waveform on top, the CIF weights below, each fired token a
    dashed line across both, labelled.

    With ``token_timings``, a thin solid line in another colour stands
    across both at the start of each token of the transcript (labelled on
    the waveform with ``timing_labels``), and a legend names the two kinds
    of line ("CIF fired", "Whisper timings (transcript)").

    Arguments
    ---------
    wav : torch.Tensor
        (samples,) the clip.
    sample_rate : int
        Its rate.
    alphas : torch.Tensor
        (T,) CIF weights (scaled so that they sum to the token count).
    fires : list of int
        Frame of each fired token.
    labels : list of str
        A label per fired token.
    frame_rate : float
        CIF frames per second.
    path : str or pathlib.Path
        The PNG.
    title : str, optional
        Figure title.
    token_timings : torch.Tensor or sequence of (float, float), optional
        ``(N, 2)`` (start, end) seconds of the transcript's LLM tokens
        (:func:`~speechbrain_blspkd.dataprep.token_timings.
        utterance_timings`); None: no timing marks (the plot as before).
    timing_labels : list of str, optional
        A label per timed token.

    Returns
    -------
    pathlib.Path

    Example
    -------
    >>> import tempfile, torch
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "cif.png"
    >>> _ = plot_cif_over_waveform(torch.randn(8000), 16000,
    ...     torch.tensor([0.5, 0.7, 0.8]), [1, 2], ["hi", "yo"], 6.0, out,
    ...     token_timings=[(0.05, 0.2), (0.2, 0.4)], timing_labels=["h", "y"])
    >>> out.read_bytes()[:4] == b"\\x89PNG"
    True
    """
    import torch

    samples = wav.detach().float().cpu()
    step = max(1, samples.numel() // 4000)  # enough points for 9 inches
    shown = samples[::step]
    times = torch.arange(shown.numel()) * (step / sample_rate)
    fig = _new_figure(9.0, 3.6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1.3])
    top.plot(times.numpy(), shown.numpy(), color="tab:gray", linewidth=0.6)
    top.set_ylabel("waveform")
    top.set_yticks([])
    alphas = alphas.detach().float().cpu()
    frame_times = torch.arange(alphas.numel()) / frame_rate
    bottom.bar(
        frame_times.numpy(),
        alphas.numpy(),
        width=1.0 / frame_rate,
        align="edge",
        color="tab:blue",
        alpha=0.7,
    )
    bottom.set_ylabel("CIF weight")
    bottom.set_xlabel("time (s)")
    peak = max(float(alphas.max()) if alphas.numel() else 0.0, 1e-6)
    bottom.set_ylim(0, peak * 1.45)
    fired = [(frame + 1) / frame_rate for frame in fires]
    _mark_fired_tokens([bottom, top], fired, labels, peak * 1.05, fontsize=8)
    if token_timings is not None and mark_token_timings(
        [bottom, top], token_timings, labels=timing_labels, label_ax=top
    ):
        bottom.legend(loc="upper right", fontsize=7, framealpha=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_png(fig, path)


def _parse_value(text):
    try:
        return float(text)
    except ValueError:
        return None


def parse_train_log(source):
    """Parse SpeechBrain ``train_log.txt`` lines into dicts of numbers.

    A line looks like ``epoch: 1, lr: 1.00e-03 - train loss: 1.23 -
    valid loss: 1.10, valid wer: 12.30``: sections separated by " - ",
    items by ", ", each item "key: value".  Values that are not numbers are
    skipped, as are lines without any number.

    Arguments
    ---------
    source : str, pathlib.Path or list of str
        Path of the log, or its lines.

    Returns
    -------
    list of dict
        One dict per line, key -> float.

    Example
    -------
    >>> parse_train_log(["epoch: 2, lr: 1.00e-03 - train loss: 1.5"])
    [{'epoch': 2.0, 'lr': 0.001, 'train loss': 1.5}]
    """
    if isinstance(source, str | pathlib.Path):
        lines = pathlib.Path(source).read_text(encoding="utf-8").splitlines()
    else:
        lines = list(source)
    records = []
    for line in lines:
        record = {}
        for section in line.strip().split(" - "):
            for item in section.split(", "):
                key, sep, value = item.rpartition(": ")
                if not sep or not key.strip():
                    continue
                number = _parse_value(value.strip())
                if number is not None:
                    record[key.strip()] = number
        if record:
            records.append(record)
    return records


def load_stats(source):
    """Load training statistics from a train_log.txt, a JSONL or dicts.

    Arguments
    ---------
    source : str, pathlib.Path or list of dict
        A SpeechBrain ``train_log.txt``, a JSONL file of step-level stats
        (one JSON object per line, ending ``.jsonl``), or the dicts.

    Returns
    -------
    list of dict
        Numeric fields only.

    Example
    -------
    >>> load_stats([{"step": 1, "loss": 2.0, "note": "x"}])
    [{'step': 1.0, 'loss': 2.0}]
    """
    if isinstance(source, str | pathlib.Path):
        path = pathlib.Path(source)
        if path.suffix != ".jsonl":
            return parse_train_log(path)
        raw = read_jsonl(path)
    else:
        raw = list(source)
    records = []
    for i, row in enumerate(raw):
        if not isinstance(row, dict):
            raise ValueError(f"load_stats: item {i} is not a dict: {row!r}")
        records.append(
            {
                str(k): float(v)
                for k, v in row.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
    return records


def _metric_name(key):
    """'train loss' -> 'loss'; keys without a split prefix stay."""
    first, _, rest = key.partition(" ")
    return rest if first in _SPLITS and rest else key


def plot_training_curves(source, path, x_key=None, title=None):
    """PNG with one panel per metric against epoch (or step).

    Train, valid and test values of the same metric ("train loss",
    "valid loss") share a panel.  When an x field is used, rows without it
    (e.g. SpeechBrain's "Epoch loaded: ..." test line) are left out.

    Arguments
    ---------
    source : str, pathlib.Path or list of dict
        See :func:`load_stats`.
    path : str or pathlib.Path
        Destination PNG.
    x_key : str, optional
        Field for the x axis; default "epoch", else "step", else the row
        number.
    title : str, optional
        Figure title.

    Returns
    -------
    pathlib.Path
        ``path``.

    Example
    -------
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "curves.png"
    >>> rows = [{"epoch": 1, "train loss": 2.0}, {"epoch": 2, "train loss": 1}]
    >>> _ = plot_training_curves(rows, out)
    >>> out.read_bytes()[:4] == b"\\x89PNG"
    True
    """
    records = load_stats(source)
    if not records:
        raise ValueError(f"plot_training_curves: no statistics in {source!r}")
    if x_key is None:
        x_key = next(
            (k for k in ("epoch", "step") if any(k in r for r in records)),
            None,
        )
    panels = {}
    for row in records:
        for key in row:
            if key not in (x_key, "time"):  # the step log's wall clock
                panels.setdefault(_metric_name(key), [])
                if key not in panels[_metric_name(key)]:
                    panels[_metric_name(key)].append(key)
    if not panels:
        raise ValueError("plot_training_curves: no metric besides the x axis")

    ncols = min(3, len(panels))
    nrows = (len(panels) + ncols - 1) // ncols
    fig = _new_figure(4.5 * ncols, 3.2 * nrows)
    for i, (name, keys) in enumerate(panels.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for key in keys:
            xs, ys = [], []
            for j, row in enumerate(records):
                if key in row and (x_key is None or x_key in row):
                    xs.append(row[x_key] if x_key else j)
                    ys.append(row[key])
            ax.plot(xs, ys, marker="o" if len(xs) < 50 else None, label=key)
        ax.set_title(name)
        ax.set_xlabel(x_key or "row")
        if len(keys) > 1 or keys[0] != name:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save_png(fig, path)
