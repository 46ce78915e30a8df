"""Small helpers shared by the command-line entry points.

Every ``main`` of the package turns the errors that mean "bad input" into a
one-line ``error: ...`` message instead of a traceback: either by returning
an exit status (:func:`report_error`, :func:`report_run`) or by raising ``SystemExit``
(:func:`exit_on_error`).
"""

import logging
import sys


def report_error(message, prog=None, status=1):
    """Print ``[prog: ]error: message`` to stderr and return ``status``.

    Arguments
    ---------
    message : str or Exception
        What went wrong.
    prog : str, optional
        Program name to put in front of the message.
    status : int
        The exit status to return.

    Returns
    -------
    int
        ``status``, for ``return report_error(...)`` in a ``main``.

    Example
    -------
    >>> import contextlib, io
    >>> err = io.StringIO()
    >>> with contextlib.redirect_stderr(err):
    ...     report_error("no such file", prog="tool", status=2)
    2
    >>> err.getvalue()
    'tool: error: no such file\\n'
    """
    prefix = f"{prog}: " if prog else ""
    print(f"{prefix}error: {message}", file=sys.stderr)
    return status


def report_run(errors, run, prog=None, status=1):
    """Call ``run()`` and print the line it returns: a ``main``'s tail.

    Returns 0 after success; an exception of ``errors`` is reported instead
    (:func:`report_error`) and ``status`` returned.

    Arguments
    ---------
    errors : type or tuple of type
        Exception types that mean bad input (no traceback wanted).
    run : callable
        The work, called without arguments; returns the summary line to
        print (or ``None``).
    prog : str, optional
        Program name to put in front of an error message.
    status : int
        The exit status returned after an error.

    Returns
    -------
    int
        0 after success, else ``status``.

    Example
    -------
    >>> report_run(ValueError, lambda: f"{int('3')} rows written")
    3 rows written
    0
    >>> import contextlib, io
    >>> with contextlib.redirect_stderr(io.StringIO()):
    ...     report_run(ValueError, lambda: int("x"), status=2)
    2
    """
    try:
        line = run()
    except errors as e:
        return report_error(e, prog=prog, status=status)
    if line is not None:
        print(line)
    return 0


def per(amount, total):
    """``amount / total``, or 0.0 when ``total`` is 0 (rates in summaries).

    Example
    -------
    >>> per(6, 3), per(6, 0)
    (2.0, 0.0)
    """
    return amount / total if total else 0.0


def exit_on_error(errors, func, *args, **kwargs):
    """Call ``func(*args, **kwargs)``; ``errors`` become ``SystemExit``.

    Arguments
    ---------
    errors : type or tuple of type
        Exception types that mean bad input (no traceback wanted).
    func : callable
        What to run.
    *args, **kwargs
        Passed to ``func``.

    Returns
    -------
    What ``func`` returns.

    Example
    -------
    >>> def parse(text):
    ...     return int(text)
    >>> exit_on_error(ValueError, parse, "3")
    3
    >>> exit_on_error(ValueError, parse, "x")
    Traceback (most recent call last):
    ...
    SystemExit: error: invalid literal for int() with base 10: 'x'
    """
    try:
        return func(*args, **kwargs)
    except errors as e:
        raise SystemExit(f"error: {e}") from None


def setup_logging(fmt="%(message)s"):
    """Log INFO messages to stderr in the format ``fmt`` (command lines).

    Does nothing when the root logger already has handlers.

    Example
    -------
    >>> setup_logging()
    """
    logging.basicConfig(level=logging.INFO, format=fmt)
