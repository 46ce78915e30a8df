"""The demo's time budget, stage by stage, from this run's figures.

``make demo`` runs the SynthSpeech BLSP-KD recipe
(``recipes/SynthSpeech/speech_llm/hparams/blsp_kd.yaml``). Its work is
counted from that YAML (corpus size, continuation rows and length, epochs,
batch sizes, evaluation rows, tasks and answer length) and priced with the
rates measured earlier in the same run (speech synthesis per clip, encoder
per clip, align and KD step times, greedy tokens per second at batch 32),
so the estimate follows both the recipe and the machine. The target is 30
minutes end to end with the assets cached.
"""

import math
import pathlib
import tempfile
import time

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_YAML = ROOT / "recipes/SynthSpeech/speech_llm/hparams/blsp_kd.yaml"
TARGET_MINUTES = 30


class _Loader(yaml.SafeLoader):
    """Reads a HyperPyYAML file's plain values; tagged nodes become None."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


class _NodeLoader(yaml.SafeLoader):
    """Reads a HyperPyYAML file's tagged nodes as plain data: a ``!new:``
    or ``!name:`` mapping as a dict, ``!ref <key>`` as a :class:`_Ref`."""


class _Ref(str):
    """A ``!ref <key>`` value: the key it names."""


def _plain_node(loader, suffix, node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    value = loader.construct_scalar(node)
    return _Ref(value.strip("<> ")) if suffix == "ref" else value


_NodeLoader.add_multi_constructor("!", _plain_node)


def recipe_counts(path=DEMO_YAML):
    """The plain values of a recipe YAML (tags unresolved)."""
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_Loader)


def recipe_arguments(name, path=DEMO_YAML):
    """The arguments a recipe YAML gives the object of its key ``name``
    (a ``!new:`` mapping), each ``!ref <key>`` replaced by that key's
    plain value; a ``!ref`` to anything but a top-level key is refused.

    HyperPyYAML builds every object of the file (the assets included) to
    resolve one; the benchmarks need only the numbers, without the assets.
    """
    with open(path, encoding="utf-8") as f:
        values = yaml.load(f, Loader=_NodeLoader)
    node = values.get(name)
    if not isinstance(node, dict):
        raise KeyError(f"{path}: {name!r} is not a mapping of arguments")
    arguments = {}
    for key, value in node.items():
        if isinstance(value, _Ref):
            if value not in values or isinstance(values[value], _Ref):
                raise KeyError(
                    f"{path}: {name}.{key}: !ref <{value}> is not a plain "
                    "top-level value"
                )
            value = values[value]
        arguments[key] = value
    return arguments


def synthesis_seconds_per_clip(rounds=3):
    """Seconds to speak one training sentence with espeak-ng (best of)."""
    from speechbrain_blspkd.dataprep.tts import synthesise

    best = math.inf
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            start = time.perf_counter()
            synthesise(
                "It is amazing how nice people are to you when you are "
                "going away.",
                pathlib.Path(tmp) / f"{i}.wav",
            )
            best = min(best, time.perf_counter() - start)
    return best


def run(args, figures):
    """Per-stage seconds of the demo and the total, in minutes too."""
    y = recipe_counts()
    workers = 2  # the recipe's synthesis workers
    clips = y["num_train"] + y["num_valid"] + y["num_test"]
    kd_rows = y["kd_train_subset"] or y["num_train"]
    gen = figures["generate"]
    steps = figures["train_step"]
    enc = figures["encoder"]
    tokens_per_s = gen["tokens_per_s"]
    encode_per_clip = enc["cache.encode_seconds"] / enc["cache.batch"]
    align_batch = y["align_batch_size"]
    align_steps = math.ceil(y["num_train"] / align_batch)
    kd_steps = math.ceil(kd_rows / y["kd_dataloader_opts"]["batch_size"])
    eval_rows = min(y["num_test"], y["eval_max_utterances"] or y["num_test"])
    tasks = len(y["eval_tasks"])
    # each evaluation decodes speech and text answers per task; the teacher's
    # text answers are cached across evaluations (untrained, trained)
    evaluations = 2 if y.get("eval_untrained") else 1
    eval_tokens = eval_rows * tasks * y["eval_max_new_tokens"]
    stages = {
        "synthesis": clips * synthesis_seconds_per_clip() / workers,
        "continuations": (kd_rows + y["num_valid"] + y["num_test"])
        * y["continuation_max_new_tokens"]
        / tokens_per_s,
        "feature_cache": clips * encode_per_clip,
        "align": y["align_epochs_limit"] * align_steps * steps["align.seconds"],
        "kd": y["kd_epochs_limit"] * kd_steps * steps["kd.seconds"],
        # validation after each epoch: teacher and student forward of the
        # valid rows (about a third of a KD step per KD-sized batch)
        "validation": (y["align_epochs_limit"] + y["kd_epochs_limit"])
        * math.ceil(y["num_valid"] / y["kd_dataloader_opts"]["batch_size"])
        * steps["kd.seconds"]
        / 3,
        "evaluation": eval_tokens * (evaluations + 1) / tokens_per_s,
    }
    out = {f"{k}.seconds": v for k, v in stages.items()}
    out["align.steps"] = y["align_epochs_limit"] * align_steps
    out["kd.steps"] = y["kd_epochs_limit"] * kd_steps
    total = sum(stages.values())
    out["total.seconds"] = total
    out["total.minutes"] = total / 60
    out["target_minutes"] = TARGET_MINUTES
    out["fits"] = total <= TARGET_MINUTES * 60
    return out
