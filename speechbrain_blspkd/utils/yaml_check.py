"""Refuse command-line overrides that name keys the YAML does not define.

HyperPyYAML silently adds an unknown override key, so a typo such as
``--lerning_rate=1e-3`` would train with the default.  Recipes call
:func:`check_overrides` before loading the YAML.
"""

import re

import yaml

_TOP_KEY = re.compile(r"^([A-Za-z_][\w\-]*)\s*:", re.MULTILINE)


class UnknownOverrideError(ValueError):
    """An override names a key that the hyperparameter file lacks."""


def top_level_keys(yaml_text):
    """Top-level keys of a (Hyper)YAML text, without resolving tags.

    Example
    -------
    >>> sorted(top_level_keys("a: 1\\nb: !ref <a>\\n  c: 2\\n"))
    ['a', 'b']
    """
    return set(_TOP_KEY.findall(yaml_text))


def check_overrides(yaml_text, overrides, source="hyperparameters"):
    """Raise :class:`UnknownOverrideError` for override keys not in the YAML.

    Arguments
    ---------
    yaml_text : str
        The hyperparameter file's text.
    overrides : str or dict
        Overrides as ``sb.parse_arguments`` returns them (a YAML string).
    source : str
        Name of the file, for the message.

    Example
    -------
    >>> check_overrides("lr: 1\\n", "lr: 2\\n")
    >>> check_overrides("lr: 1\\n", "lrr: 2\\n")
    Traceback (most recent call last):
    ...
    speechbrain_blspkd.utils.yaml_check.UnknownOverrideError: override(s) ['lrr'] not defined in hyperparameters (did you mean: lr?)
    """
    if not overrides:
        return
    if isinstance(overrides, str):
        keys = set(top_level_keys(overrides))
        if not keys:
            loaded = yaml.safe_load(overrides) or {}
            keys = set(loaded)
    else:
        keys = set(overrides)
    known = top_level_keys(yaml_text)
    unknown = sorted(keys - known)
    if unknown:
        import difflib

        hints = [
            m
            for k in unknown
            for m in difflib.get_close_matches(k, sorted(known), n=1)
        ]
        hint = f" (did you mean: {', '.join(hints)}?)" if hints else ""
        raise UnknownOverrideError(
            f"override(s) {unknown} not defined in {source}{hint}"
        )
