"""The recipe runner: every ``train.py`` is a thin script around it.

:func:`run_recipe` runs one recipe YAML end to end: it prepares the corpus
into the shared manifest schema, writes the teacher continuations (and the
stored top-k teacher where a stage reads it), caches the frozen encoder's
features, writes the token timings, trains the
:class:`~speechbrain_blspkd.brain.SpeechLLMBrain` through the stages the
YAML declares, evaluates (the test objective and the parity decoding) and
exports the inference folder.  The preparation steps are here too
(:func:`prepare_features`, :func:`prepare_continuations`); the data
pipelines are in :mod:`speechbrain_blspkd.dataio.pipelines`.
"""

import logging
import os

import speechbrain as sb
import torch

from speechbrain_blspkd.brain import SpeechLLMBrain
from speechbrain_blspkd.dataio.pipelines import dataio_prepare
from speechbrain_blspkd.dataio.sampler import loader_kwargs
from speechbrain_blspkd.utils import precision as precision_lib
from speechbrain_blspkd.utils import sharding
from speechbrain_blspkd.utils.run_options import (
    requested_option,
    resolve_run_precision,
)

logger = logging.getLogger(__name__)

__all__ = [
    "close_process_group",
    "prepare_continuations",
    "prepare_features",
    "run_recipe",
]


def _encoder_fn(encoder, device):
    """``wavs (list of 1-D) -> list of (frames, d)`` for the feature cache."""

    from speechbrain.utils.data_utils import batch_pad_right

    @torch.no_grad()
    def encode(wavs):
        batch, rel = batch_pad_right([w.float() for w in wavs])
        feats, feat_lens = encoder(batch.to(device), rel.to(device))
        frames = torch.round(feat_lens * feats.shape[1]).long().clamp(min=1)
        return [f[: int(n)].float().cpu() for f, n in zip(feats, frames)]

    return encode


def prepare_features(hparams, encoder, device):
    """Cache frozen-encoder features of every split (resumable, checked).

    Call it on every rank: under ``torchrun`` the utterances are split
    across all ranks and every node's ``feature_cache_folder`` receives the
    whole cache through the process group (see
    :func:`~speechbrain_blspkd.dataprep.feature_cache.build_feature_cache`).

    Arguments
    ---------
    hparams : dict
        The recipe's hyperparameters (``use_feature_cache``,
        ``feature_cache_folder``, the manifests ...).
    encoder : torch.nn.Module or None
        The model's speech encoder, already on ``device``.
    device : str or torch.device
        This rank's device.

    Returns
    -------
    FeatureCache or None
        None when ``hparams["use_feature_cache"]`` is False, the model has
        no encoder (the cascade reads audio) or the encoder is trainable
        (its features change during training).
    """
    from speechbrain_blspkd.dataprep.feature_cache import (
        FeatureCache,
        build_feature_cache,
        feature_checksum,
    )

    if (
        encoder is None
        or not hparams["use_feature_cache"]
        or not encoder.freeze
    ):
        return None
    checksum = feature_checksum(encoder)
    folder = hparams["feature_cache_folder"]
    for key in ("train_manifest", "valid_csv", "test_csv"):
        build_feature_cache(
            hparams[key],
            folder,
            _encoder_fn(encoder, device),
            checksum,
            batch_size=hparams["feature_batch_size"],
            data_root=hparams["data_root"],
            sample_rate=hparams["sample_rate"],
            max_seconds=hparams["max_audio_seconds"],
        )
    return FeatureCache(folder, checksum)


def prepare_continuations(hparams, device=None):
    """Teacher continuations of the KD training rows, valid and test.

    The KD stage trains on the first ``kd_train_subset`` utterances of
    ``train_manifest`` (all when it is null); only those need the LLM's
    continuation, which is the costly part of data preparation.  Results are
    resumable (see :mod:`speechbrain_blspkd.dataprep.continuations`).
    ``continuation_device: null`` runs the LLM on the run's ``device``
    (default: speechbrain's ``infer_device``, the rank's own GPU under
    ``torchrun``).  The prompt is the model's text-teacher prompt:
    ``instruction`` with the model's system prompt and transcript separator.

    Call it on every rank: under ``torchrun`` every rank generates its
    shard of the rows and every node writes the whole manifests
    (:func:`~speechbrain_blspkd.dataprep.continuations.
    generate_on_all_ranks`); a manifest that every node has already is
    not generated again.
    """
    from speechbrain_blspkd.dataio.manifest import read_manifest, write_manifest
    from speechbrain_blspkd.dataprep.continuations import generate_on_all_ranks

    prompts = hparams["model"].prompts
    subset = hparams["kd_train_subset"]
    train_src = hparams["train_manifest"]
    if subset:
        rows = read_manifest(train_src)[: int(subset)]
        train_src = f"{hparams['train_csv']}.input.csv"
        if sb.utils.distributed.is_local_rank_zero():  # one per node
            write_manifest(train_src, rows)
        sb.utils.distributed.ddp_barrier()
    jobs = [
        (train_src, hparams["train_csv"]),
        (hparams["valid_manifest"], hparams["valid_csv"]),
        (hparams["test_manifest"], hparams["test_csv"]),
    ]
    device = hparams["continuation_device"] or device
    for src, dst in jobs:
        generate_on_all_ranks(
            src,
            dst,
            model_dir=hparams["llm_source"],
            batch_size=hparams["continuation_batch_size"],
            max_new_tokens=hparams["continuation_max_new_tokens"],
            instruction=hparams["instruction"],
            system_prompt=prompts.system_prompt,
            transcript_separator=prompts.transcript_separator,
            device=device or sb.utils.distributed.infer_device(),
            dtype=hparams["continuation_dtype"],
        )


def run_recipe(argv):
    """``train.py hparams.yaml [--overrides]``: prepare, train, test, export.

    Arguments
    ---------
    argv : list of str
        Command-line arguments (``sys.argv[1:]``).
    """
    import json

    from hyperpyyaml import load_hyperpyyaml

    from speechbrain_blspkd.evaluation import evaluate_parity
    from speechbrain_blspkd.utils.yaml_check import check_overrides

    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    sb.utils.distributed.ddp_init_group(run_opts)
    # the device `dtype: auto` in the YAML resolves for
    device = run_opts.get("device") or sb.utils.distributed.infer_device()
    precision_lib.set_run_device(device)
    # decide `auto` now, on every process at once (one answer for all)
    auto = precision_lib.choose(torch.device(device).type)
    with open(hparams_file, encoding="utf-8") as fin:
        text = fin.read()
    check_overrides(text, overrides, hparams_file)
    hparams = load_hyperpyyaml(text, overrides)
    requested_precision = requested_option(hparams, run_opts, "precision")
    run_opts = resolve_run_precision(hparams, run_opts)
    # refuse an unsupported sharding set-up before the data preparation
    sharding.resolve_strategy(
        hparams.get("distributed_strategy", "ddp"),
        precision=run_opts["precision"],
        data_parallel=bool(run_opts.get("data_parallel_backend", False)),
        distributed=True,
    )
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    logger.info(
        "precision %s (requested %s); dtype auto on %s: %s (%s)",
        run_opts["precision"],
        requested_precision,
        device,
        auto.precision,
        auto.reason,
    )
    # 1. corpus -> manifests (idempotent)
    sb.utils.distributed.run_on_main(hparams["prepare"])
    stages = list(hparams["stages"] or [])
    names = [stage.name for stage in stages]
    if len(set(names)) != len(names):
        raise ValueError(
            f"{hparams_file}: `stages` needs unique names, got {names}"
        )
    # 2. teacher continuations (idempotent, resumable); a recipe without
    # training stages (the cascade) only decodes, which needs none
    # (every rank: each generates its shard of the rows)
    if stages:
        prepare_continuations(hparams, device=device)
        # the stored top-k teacher of the stages with `teacher: offline`
        # (every rank writes its shard; a no-op otherwise)
        from speechbrain_blspkd.dataprep.teacher_topk import (
            prepare_teacher_topk,
        )

        prepare_teacher_topk(hparams, device=device)
    # 3. model
    model = hparams["model"]
    if model.encoder is not None:
        model.encoder.to(device)
    cache = prepare_features(hparams, model.encoder, device)  # every rank
    row_items = []
    if stages:  # token timings, when the recipe names their folder
        from speechbrain_blspkd.dataprep.token_timings import (
            prepare_token_timings,
            timing_items,
        )

        if sb.utils.distributed.is_local_rank_zero():  # one copy per node
            prepare_token_timings(hparams, cache, device=device)
        sb.utils.distributed.ddp_barrier()
        folder = hparams.get("token_timings_folder")
        if folder:  # each row's stored timings, as ``token_spans``
            row_items.append((timing_items(model, folder), "token_spans"))
    datasets = (
        dataio_prepare(hparams, feature_cache=cache, row_items=row_items)
        if stages
        else {}
    )
    checkpointer = hparams["checkpointer"]
    for stage in stages:  # every stage's progress is in every checkpoint
        checkpointer.add_recoverable(f"epochs_{stage.name}", stage.epochs)
        # and what an objective trains itself (training-only heads)
        owned = getattr(stage.objective, "trainable_parameters", None)
        if owned is not None and owned():
            checkpointer.add_recoverable(
                f"objective_{stage.name}", stage.objective
            )
    brain = SpeechLLMBrain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=checkpointer,
    )
    out = hparams["output_folder"]
    fresh = checkpointer.find_checkpoint() is None
    final = stages[-1] if stages else None  # its objective scores the test

    def parity(tag):
        # `eval_tasks: null` (or empty): the test objective only, nothing
        # decoded (e.g. ablations judged by their losses)
        if not hparams["eval_tasks"]:
            logger.info("eval_tasks is empty: no answers decoded (%s)", tag)
            return {}
        # A sharded LLM is gathered whole for decoding: the ranks decode
        # different rows, so their layers cannot all-gather in step.
        with sharding.gathered(brain.model):
            return evaluate_parity(
                brain.model,
                hparams["test_manifest"],
                hparams["data_root"],
                tasks=hparams["eval_tasks"],
                out_folder=os.path.join(out, "eval", tag),
                batch_size=hparams["eval_batch_size"],
                max_new_tokens=hparams["eval_max_new_tokens"],
                max_utterances=hparams["eval_max_utterances"],
                feature_cache=cache,
                sample_rate=hparams["sample_rate"],
                plot_utterances=hparams["plot_utterances"],
            )

    # 4. starting point (once, before any training); the main process
    # decides for all (the other nodes need not see its checkpoints/files)
    untrained_path = os.path.join(out, "eval", "untrained", "summary.json")
    untrained = sb.utils.distributed.ddp_broadcast(
        bool(
            hparams["eval_untrained"]
            and stages
            and fresh
            and not os.path.isfile(untrained_path)
        )
    )
    if untrained:
        brain.stage = final
        brain.evaluate(
            datasets["test"],
            min_key="loss",
            test_loader_kwargs=hparams["test_dataloader_opts"],
        )
        parity("untrained")
        _merge_json(untrained_path, {"adapter": brain.test_stats})

    # 5. training: the stages in order
    for stage in stages:
        if stage.epochs.limit == 0:
            continue
        brain.stage = stage
        train_kwargs = loader_kwargs(stage.loader_options, datasets[stage.name])
        # Brain calls set_epoch on train_sampler each epoch: a bucketed
        # order is then a function of the epoch, so a resumed run sees the
        # batches of an uninterrupted one (under DDP Brain wraps it)
        brain.train_sampler = train_kwargs.get(
            "batch_sampler"
        ) or train_kwargs.get("sampler")
        train_loader = brain.make_dataloader(
            datasets[stage.name], sb.Stage.TRAIN, **train_kwargs
        )
        brain.steps_per_epoch = -(
            -len(train_loader) // brain.grad_accumulation_factor
        )
        brain.fit(
            stage.epochs,
            train_loader,
            datasets["valid"],
            valid_loader_kwargs=hparams["valid_dataloader_opts"],
        )
    # 6. test: the final objective's stats (recovers the latest checkpoint)
    # + parity decoding
    if final is not None:
        brain.stage = final
        brain.evaluate(
            datasets["test"],
            max_key=None,
            min_key=None,
            test_loader_kwargs=hparams["test_dataloader_opts"],
        )
    trained = parity("trained")
    if final is not None:
        _merge_json(
            os.path.join(out, "eval", "trained", "summary.json"),
            {"adapter": brain.test_stats},
        )
    # 7. export the inference folder (main process) + plots
    _export(brain, hparams)
    if sb.utils.distributed.if_main_process():
        from speechbrain_blspkd.utils.plotting import plot_training_curves

        if os.path.isfile(hparams["step_log"]):
            plot_training_curves(
                hparams["step_log"], os.path.join(out, "training_curves.png")
            )
        logger.info("test summary: %s", json.dumps(trained, indent=1))
    close_process_group()
    return brain


def close_process_group():
    """Under ``torchrun``: every process waits for the others, then the
    process group is destroyed (a no-op in one process).

    Without it a rank that finished first (the others still plotting or
    exporting) tore down the gloo group at interpreter exit while its
    threads still served the other ranks: "terminate called without an
    active exception" in rank 1 of the two-process tests, now and then.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _export(brain, hparams):
    """Export on the main process; call it on every process.

    A sharded model is gathered first (a collective), so the main process
    reads whole weights while the others wait at the end of the block.
    """
    from speechbrain_blspkd.inference.export import export_model

    with sharding.gathered(brain.model):
        if sb.utils.distributed.if_main_process():
            export_model(
                brain.model,
                hparams["export_folder"],
                hparams["export"],
                overwrite=True,
            )


def _merge_json(path, extra):
    import json

    from speechbrain_blspkd.utils.atomic import atomic_write_text

    if not sb.utils.distributed.if_main_process():
        return
    data = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    data.update(extra)
    atomic_write_text(path, json.dumps(data, indent=1, default=float))
