"""The run options a recipe asks for: the command line over the YAML.

speechbrain fills every run option with a default; only those in
``RunOptions.overridden_args`` were given on the command line.
:func:`requested_option` reads an option as requested (the command line's
value when given there, else the YAML's) and
:func:`resolve_run_precision` turns ``precision: auto`` into the precision
the run's device computes fast (:mod:`speechbrain_blspkd.utils.precision`),
for the Brain and the recipe runner alike.
"""

import speechbrain as sb

from speechbrain_blspkd.utils import precision as precision_lib

__all__ = ["requested_option", "resolve_run_precision"]


def requested_option(hparams, run_opts, key):
    """A run option as requested: the command line's when it was given
    there, else the YAML's (None when neither sets it).

    speechbrain's parser fills every option with a default; only the
    options in ``RunOptions.overridden_args`` were given (a plain dict:
    every key was).

    Example
    -------
    >>> requested_option({"precision": "auto"}, {}, "precision")
    'auto'
    >>> requested_option({"precision": "auto"}, {"precision": "fp32"}, "precision")
    'fp32'
    """
    given = getattr(run_opts, "overridden_args", run_opts)
    if key in given:
        return run_opts.get(key)
    return (hparams or {}).get(key)


def resolve_run_precision(hparams, run_opts):
    """Run options with ``precision``/``eval_precision`` ``auto`` resolved.

    The run option wins over the YAML value when it was given (as in
    speechbrain's Brain: ``RunOptions.overridden_args``); ``auto`` becomes
    ``bf16`` where the run's device computes it fast and ``fp32`` otherwise
    (:mod:`speechbrain_blspkd.utils.precision`). The resolved value is
    marked as given, so the Brain uses it; every other option keeps its
    status (a default stays a default, below the YAML).

    Arguments
    ---------
    hparams : dict or None
        The YAML values.
    run_opts : speechbrain.utils.run_opts.RunOptions or dict or None
        speechbrain run options (a dict: every key counts as given).

    Returns
    -------
    RunOptions or dict
        A copy of ``run_opts`` (same type) with ``precision`` (and
        ``eval_precision`` when one is given; speechbrain's default is
        fp32) explicit.

    Example
    -------
    >>> resolve_run_precision({"precision": "bfloat16"}, {"device": "cpu"})
    {'device': 'cpu', 'precision': 'bf16'}
    >>> from speechbrain.utils.run_opts import RunOptions
    >>> opts = resolve_run_precision({"precision": "bf16"}, RunOptions())
    >>> opts.precision, sorted(opts.overridden_args), opts.max_grad_norm
    ('bf16', ['precision'], 5.0)
    """
    import dataclasses

    hparams = hparams or {}
    if run_opts is None:
        run_opts = {}
    given = set(getattr(run_opts, "overridden_args", run_opts))
    device = run_opts.get("device") or sb.utils.distributed.infer_device()
    resolved = {}
    for key in ("precision", "eval_precision"):
        value = requested_option(hparams, run_opts, key)
        if value is not None:  # else speechbrain's default (fp32)
            resolved[key] = precision_lib.resolve_precision(value, device)
    if isinstance(run_opts, dict):
        return {**run_opts, **resolved}
    return dataclasses.replace(
        run_opts, **resolved, overridden_args=given | set(resolved)
    )
