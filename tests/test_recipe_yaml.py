"""Static checks of the recipes' hyperparameter files (no model is loaded).

For every ``recipes/*/speech_llm/hparams/*.yaml``:

* every top-level key is used: referenced with ``!ref``/``!copy`` in the
  same file, read by the training code (:mod:`speechbrain_blspkd.brain`,
  :mod:`speechbrain_blspkd.recipe`, :mod:`speechbrain_blspkd.dataio.
  pipelines`; found by walking the modules' syntax trees, f-strings and
  loop variables expanded), a
  SpeechBrain run option (``speechbrain.utils.run_opts.RunOptions``), or
  ``__``-prefixed (evaluated for its side effect);
* every key that the training code requires is defined;
* the file resolves as HyperPyYAML text (references, arithmetic, the
  ``!PLACEHOLDER`` keys filled by overrides) without building any object.
"""

import ast
import pathlib
import re

import pytest
import yaml
from hyperpyyaml import resolve_references

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: The modules that read the recipe's hparams (the Brain, the recipe
#: runner, the data pipelines).
READERS = [
    ROOT / "speechbrain_blspkd" / "brain.py",
    ROOT / "speechbrain_blspkd" / "recipe.py",
    ROOT / "speechbrain_blspkd" / "dataio" / "pipelines.py",
]
RECIPE_YAMLS = sorted(ROOT.glob("recipes/*/speech_llm/hparams/*.yaml"))
IDS = [str(p.relative_to(ROOT / "recipes")) for p in RECIPE_YAMLS]

#: Values of attribute placeholders in brain.py f-strings that no loop in
#: the same function binds (``self.train_stage`` is set by run_recipe).
ATTRIBUTE_VALUES = {"self.train_stage": ("align", "kd")}
#: Attributes of ``hparams`` that are not keys (dict / namespace API).
_NOT_KEYS = {"__dict__", "get", "items", "keys", "values"}
_REF = re.compile(r"<([^<>]+)>")
_REF_HEAD = re.compile(r"[^.\[\]]+")
_OPERATOR = re.compile(r"\*|\+|%|//")


# ----------------------------------------------------------------------
# YAML side
class _Tagged:
    """A node with a HyperPyYAML tag (``!new:``, ``!ref`` ...), not built."""

    def __init__(self, tag, value):
        self.tag = tag
        self.value = value


class _TagTolerantLoader(yaml.SafeLoader):
    """Safe loader that keeps unknown tags as :class:`_Tagged` nodes."""


def _construct_tagged(loader, suffix, node):
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return _Tagged("!" + suffix, value)


_TagTolerantLoader.add_multi_constructor("!", _construct_tagged)


def load_tree(text):
    """The YAML as plain Python data, tags kept as :class:`_Tagged`."""
    tree = yaml.load(text, Loader=_TagTolerantLoader)
    assert isinstance(tree, dict), "the top level must be a mapping"
    return tree


def _walk(node):
    yield node
    if isinstance(node, _Tagged):
        yield from _walk(node.value)
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(key)
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def referenced_keys(tree):
    """Top-level keys named by ``!ref``/``!copy`` anywhere in ``tree``."""
    found = set()
    for node in _walk(tree):
        if isinstance(node, _Tagged) and node.tag in ("!ref", "!copy"):
            for ref in _REF.findall(str(node.value)):
                found.add(_REF_HEAD.match(ref.strip()).group(0))
    return found


def placeholder_keys(tree):
    """Top-level keys whose value is ``!PLACEHOLDER``."""
    return {
        k
        for k, v in tree.items()
        if isinstance(v, _Tagged) and v.tag == "!PLACEHOLDER"
    }


# ----------------------------------------------------------------------
# brain.py side
def _is_hparams(node):
    """``hparams``, ``x.hparams`` or ``x.hparams.__dict__``."""
    if isinstance(node, ast.Name):
        return node.id == "hparams"
    if isinstance(node, ast.Attribute):
        if node.attr == "hparams":
            return True
        return node.attr == "__dict__" and _is_hparams(node.value)
    return False


def _loop_values(func, name):
    """Constant values a ``for`` loop in ``func`` binds to ``name``."""
    values = []
    for node in ast.walk(func):
        if not isinstance(node, (ast.For, ast.comprehension)):
            continue
        target, it = node.target, node.iter
        if isinstance(target, ast.Name) and target.id == name:
            if isinstance(it, (ast.Tuple, ast.List)):
                values += [e.value for e in it.elts]
        elif (
            isinstance(target, ast.Tuple)
            and isinstance(target.elts[0], ast.Name)
            and target.elts[0].id == name
            and isinstance(it, ast.Call)
            and isinstance(it.func, ast.Attribute)
            and it.func.attr == "items"
            and isinstance(it.func.value, ast.Name)
        ):
            # for name, _ in some_dict.items(): keys of `some_dict = {...}`
            for assign in ast.walk(func):
                if (
                    isinstance(assign, ast.Assign)
                    and isinstance(assign.value, ast.Dict)
                    and any(
                        isinstance(t, ast.Name) and t.id == it.func.value.id
                        for t in assign.targets
                    )
                ):
                    values += [k.value for k in assign.value.keys]
    if not values or not all(isinstance(v, str) for v in values):
        return None
    return values


def _key_names(node, func, where):
    """Key names an index expression can take."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Name):
        values = _loop_values(func, node.id)
        if values is None:
            raise AssertionError(
                f"{where}: cannot resolve the key variable {node.id!r}; "
                "extend tests/test_recipe_yaml.py"
            )
        return values
    if isinstance(node, ast.JoinedStr):
        names = [""]
        for part in node.values:
            if isinstance(part, ast.Constant):
                names = [n + part.value for n in names]
                continue
            expr = ast.unparse(part.value)
            if isinstance(part.value, ast.Name):
                values = _loop_values(func, part.value.id)
            else:
                values = ATTRIBUTE_VALUES.get(expr)
            if values is None:
                raise AssertionError(
                    f"{where}: cannot expand {{{expr}}} in an hparams key; "
                    "extend tests/test_recipe_yaml.py"
                )
            names = [n + v for n in names for v in values]
        return names
    raise AssertionError(
        f"{where}: unsupported hparams key expression {ast.unparse(node)!r}"
    )


def brain_keys(source, filename="brain.py"):
    """``(required, optional)`` hparams keys that ``source`` reads.

    Required: ``hparams[...]``, ``self.hparams.key``,
    ``self.hparams.__dict__[...]``.  Optional: ``hparams.get(...)`` and
    ``getattr(self.hparams, ...)``/``hasattr(...)``.
    """
    tree = ast.parse(source, filename)
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def enclosing_function(node):
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node
        return tree

    required, optional = set(), set()
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        func = enclosing_function(node)
        if isinstance(node, ast.Subscript) and _is_hparams(node.value):
            required.update(_key_names(node.slice, func, where))
        elif (
            isinstance(node, ast.Attribute)
            and _is_hparams(node.value)
            and node.attr not in _NOT_KEYS
        ):
            required.add(node.attr)
        elif isinstance(node, ast.Call):
            fn = node.func
            if (
                isinstance(fn, ast.Attribute)
                and fn.attr == "get"
                and _is_hparams(fn.value)
            ):
                optional.update(_key_names(node.args[0], func, where))
            elif (
                isinstance(fn, ast.Name)
                and fn.id in ("getattr", "hasattr")
                and _is_hparams(node.args[0])
            ):
                optional.update(_key_names(node.args[1], func, where))
    return required, optional - required


def run_option_keys():
    """Keys SpeechBrain's ``Brain`` takes from the hparams as run options."""
    from speechbrain.utils.run_opts import RunOptions

    return set(RunOptions().as_dict()) - {"overridden_args"}


@pytest.fixture(scope="module")
def brain_reads():
    required, optional = set(), set()
    for path in READERS:
        more, maybe = brain_keys(path.read_text(encoding="utf-8"), str(path))
        required |= more
        optional |= maybe
    return required, optional - required


def unused_keys(text, brain_required, brain_optional):
    """Top-level keys of ``text`` that nothing uses."""
    tree = load_tree(text)
    used = (
        referenced_keys(tree)
        | brain_required
        | brain_optional
        | run_option_keys()
    )
    return sorted(k for k in tree if k not in used and not k.startswith("__"))


# ----------------------------------------------------------------------
# tests
def test_recipes_found():
    names = {p.parts[-4] for p in RECIPE_YAMLS}
    assert {"SynthSpeech", "LibriSpeech", "CommonVoice", "GigaSpeech"} <= names


def test_brain_key_extraction():
    source = """
def f(hparams, self):
    hparams["a"]
    self.hparams.b
    self.hparams.__dict__[f"{self.train_stage}_c"]
    hparams.get("d")
    getattr(self.hparams, "e", None)
    for split in ("x", "y"):
        hparams[f"{split}_f"]
    table = {"p": 1, "q": 2}
    for name, _ in table.items():
        hparams[name]
    for key in ("g1", "g2"):
        hparams[key]
    self.hparams.h(1)
"""
    required, optional = brain_keys(source)
    assert required == {
        "a",
        "b",
        "align_c",
        "kd_c",
        "x_f",
        "y_f",
        "p",
        "q",
        "g1",
        "g2",
        "h",
    }
    assert optional == {"d", "e"}
    with pytest.raises(AssertionError, match="cannot expand"):
        brain_keys('def f(hparams, z):\n    hparams[f"{z}_a"]\n')


def test_brain_reads_core_keys(brain_reads):
    required, _ = brain_reads
    # sanity: the extraction sees the keys every recipe is built around
    for key in ("model", "prepare", "stages", "valid_csv", "test_csv"):
        assert key in required


def test_unused_key_is_detected(brain_reads):
    text = RECIPE_YAMLS[0].read_text(encoding="utf-8")
    extra = text + "\nsome_forgotten_key: 3\n"
    assert unused_keys(extra, *brain_reads) == sorted(
        set(unused_keys(text, *brain_reads)) | {"some_forgotten_key"}
    )
    referenced = extra + "other_key: !ref <some_forgotten_key>/x\n"
    assert "some_forgotten_key" not in unused_keys(referenced, *brain_reads)


@pytest.mark.parametrize("path", RECIPE_YAMLS, ids=IDS)
def test_every_key_is_used(path, brain_reads):
    unused = unused_keys(path.read_text(encoding="utf-8"), *brain_reads)
    assert not unused, f"{path}: keys defined but never used: {unused}"


@pytest.mark.parametrize("path", RECIPE_YAMLS, ids=IDS)
def test_brain_keys_defined(path, brain_reads):
    required, _ = brain_reads
    tree = load_tree(path.read_text(encoding="utf-8"))
    missing = sorted(required - set(tree))
    assert not missing, (
        f"{path}: keys the training code reads are missing: {missing}"
    )


def _arithmetic_refs(orig, resolved, where="root"):
    """``(where, value)`` of every arithmetic ``!ref`` after resolution."""
    if isinstance(orig, _Tagged):
        if orig.tag == "!ref":
            if _OPERATOR.search(_REF.sub("0", str(orig.value))):
                yield where, resolved
            return
        resolved = getattr(resolved, "value", resolved)
        orig = orig.value
    if isinstance(orig, dict) and isinstance(resolved, dict):
        for key, value in orig.items():
            yield from _arithmetic_refs(
                value, resolved.get(key), f"{where}.{key}"
            )
    elif isinstance(orig, list) and isinstance(resolved, list):
        for i, (a, b) in enumerate(zip(orig, resolved)):
            yield from _arithmetic_refs(a, b, f"{where}[{i}]")


def test_arithmetic_refs_found():
    text = "a: 2\nb: !ref <a> * 3\nc: !ref <a>/x\nd: {e: !ref (<a> + 1)}\n"
    found = dict(_arithmetic_refs(load_tree(text), load_tree(resolve(text))))
    assert found == {"root.b": 6, "root.d.e": 3}


def resolve(text, overrides=None):
    """HyperPyYAML text with references and arithmetic resolved."""
    return resolve_references(
        text, overrides, overrides_must_match=True
    ).getvalue()


@pytest.mark.parametrize("path", RECIPE_YAMLS, ids=IDS)
def test_yaml_resolves_with_placeholders_filled(path):
    text = path.read_text(encoding="utf-8")
    tree = load_tree(text)
    # a number fills path and count placeholders alike
    overrides = dict.fromkeys(placeholder_keys(tree), 1000)
    after = load_tree(resolve(text, overrides))
    assert set(after) == set(tree)
    left = [
        n
        for n in _walk(after)
        if isinstance(n, _Tagged) and n.tag in ("!ref", "!PLACEHOLDER")
    ]
    assert not left, f"{path}: unresolved after overrides: {left}"
    for key in overrides:
        assert after[key] == overrides[key]
    # an expression hyperpyyaml cannot evaluate silently stays a string
    for where, value in _arithmetic_refs(tree, after):
        assert isinstance(value, (int, float)), (
            f"{path}: {where} did not evaluate to a number: {value!r}"
        )
    if overrides:
        with pytest.raises(ValueError, match="PLACEHOLDER"):
            resolve_references(text)


@pytest.mark.parametrize("path", RECIPE_YAMLS, ids=IDS)
def test_recipe_folder_complete(path):
    folder = path.parents[1]
    assert (folder / "README.md").is_file(), f"{folder}: no README.md"
    train = (folder / "train.py").read_text(encoding="utf-8")
    assert "run_recipe(sys.argv[1:])" in train, f"{folder}/train.py"


def _synthspeech_corpus(path):
    """``(data_folder, plan options)`` of a SynthSpeech YAML, resolved."""
    text = path.read_text(encoding="utf-8")
    tree = load_tree(
        resolve(text, dict.fromkeys(placeholder_keys(load_tree(text)), 1000))
    )
    prepare = tree["prepare"]
    assert isinstance(prepare, _Tagged) and prepare.tag.endswith(
        "prepare_synthspeech"
    ), f"{path}: prepare is not prepare_synthspeech"
    import inspect

    from speechbrain_blspkd.dataprep.synthspeech import prepare_synthspeech

    # what the call plans with: the YAML's arguments over the defaults
    defaults = {
        k: p.default
        for k, p in inspect.signature(prepare_synthspeech).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    options = {
        k: v
        for k, v in {**defaults, **prepare.value}.items()
        if k not in ("save_folder", "num_workers", "skip_prep")
    }
    assert prepare.value["save_folder"] == tree["data_folder"], path
    return tree["data_folder"], options


def test_synthspeech_yamls_sharing_a_folder_plan_one_corpus():
    # a data folder keeps one plan (prepare_synthspeech refuses another
    # where features or continuations were made), so two YAMLs whose
    # default folder is the same must ask for the same corpus, and the
    # English ones share make demo's (the README runs them on its data)
    yamls = sorted(ROOT.glob("recipes/SynthSpeech/speech_llm/hparams/*.yaml"))
    corpora = {p.name: _synthspeech_corpus(p) for p in yamls}
    by_folder = {}
    for name, (folder, options) in corpora.items():
        by_folder.setdefault(folder, []).append((name, options))
    for folder, users in by_folder.items():
        first_name, first = users[0]
        for name, options in users[1:]:
            assert options == first, (
                f"{name} and {first_name} share {folder} but plan "
                f"different corpora: {options} != {first}"
            )
    demo_folder, _ = corpora["blsp_kd.yaml"]
    english = [n for n, (_, o) in corpora.items() if o["languages"] == ["en"]]
    assert len(english) >= 5
    assert all(corpora[n][0] == demo_folder for n in english), english
