"""Teacher continuations: the instruction LLM continues every transcript.

For each manifest row the teacher LLM gets the generation prompt of
:class:`~speechbrain_blspkd.prompt.PromptBuilder` for the instruction and
the transcript (the chat template, system prompt, ``instruction`` +
``transcript_separator`` + transcript, then the assistant header): token
for token the prompt of the text teacher in training and decoding, so the
continuation is the answer the training teacher would give.  The LLM
decodes greedily up to ``max_new_tokens`` and the answer is stored in the
``continuation`` column; ``truncated`` is ``1`` when the limit was reached
before the end-of-turn token (training then appends no end-of-turn token).

Generation is batched (left padding, KV cache through ``model.generate``,
rows sorted by prompt length: :mod:`speechbrain_blspkd.dataprep.
greedy_generation`), sharded (``shard=(i, n)`` takes rows
``i, i + n, i + 2n ...``) and resumable: every finished batch is appended to
a per-shard JSONL progress file and synced to disk; a restarted run skips the
IDs already there (a half-written last line is cut off;
:mod:`speechbrain_blspkd.dataprep.shard_progress`).  The output
manifest is written atomically once every row is done; with several shards,
each shard writes ``<out>.shard<i>of<n>.csv`` and :func:`merge_continuations`
(CLI ``--merge``) joins them into ``<out>``.  Under ``torchrun``,
:func:`generate_on_all_ranks` runs shard ``rank/world`` on every rank and
merges the rows through the process group, so every node writes the whole
``<out>`` without reading another node's files.

The model runs on ``device`` (default: speechbrain's ``infer_device``: the
rank's own GPU under ``torchrun``, else the first GPU, else the CPU).

Command line::

    python -m speechbrain_blspkd.dataprep.continuations IN.csv OUT.csv \\
        [--model-dir DIR] [--batch-size 16] [--max-new-tokens 48] \\
        [--shard 0/2] [--dtype auto] [--device cuda:0] \\
        [--instruction TEXT] [--system-prompt TEXT]
    python -m speechbrain_blspkd.dataprep.continuations IN.csv OUT.csv \\
        --merge --shard 0/2
"""

import argparse
import hashlib
import logging
import pathlib
import sys

import speechbrain as sb

from speechbrain_blspkd.dataio.manifest import (
    COLUMNS,
    read_manifest,
    write_manifest,
)
from speechbrain_blspkd.dataprep.greedy_generation import (
    LLM_DTYPES,
    generate_greedy,
    load_causal_lm,
)
from speechbrain_blspkd.dataprep.shard_progress import (
    add_worker_options,
    check_finished,
    check_shard,
    load_progress,
    open_progress,
    parse_shard,
    parse_worker_args,
    progress_path,
    settings_line,
)
from speechbrain_blspkd.prompt import PromptBuilder
from speechbrain_blspkd.utils.cli import per, report_run
from speechbrain_blspkd.utils.precision import resolve_dtype

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Continue the following text in a coherent style:"


def _shard_manifest_path(manifest_out, shard):
    i, n = shard
    out = pathlib.Path(manifest_out)
    if n == 1:
        return out
    return out.with_name(f"{out.stem}.shard{i}of{n}{out.suffix}")


def _rows_hash(rows):
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r['ID']}\t{r['transcript']}\n".encode())
    return h.hexdigest()[:16]


def _out_row(row, rec):
    out = {c: row.get(c, "") for c in COLUMNS}
    out["continuation"] = rec["continuation"]
    out["truncated"] = str(rec["truncated"])
    return out


def generate_continuations(
    manifest_in,
    manifest_out,
    model_dir=None,
    batch_size=16,
    max_new_tokens=48,
    shard=(0, 1),
    instruction=DEFAULT_INSTRUCTION,
    system_prompt=None,
    transcript_separator=" ",
    device=None,
    dtype="auto",
    stop_after_batches=None,
):
    """Generate the teacher continuation of every row of one shard.

    Arguments
    ---------
    manifest_in : str or pathlib.Path
        Input manifest (transcripts).
    manifest_out : str or pathlib.Path
        Output manifest: the input rows plus ``continuation`` and
        ``truncated``.  With ``n > 1`` shards this shard writes
        ``<stem>.shard<i>of<n>.csv`` instead; merge with
        :func:`merge_continuations`.
    model_dir : str or pathlib.Path, optional
        A local transformers causal-LM folder with a chat template
        (default: the ``smollm2-135m-instruct`` asset).
    batch_size : int
        Rows per ``generate`` call.
    max_new_tokens : int
        Generation limit.
    shard : tuple of int
        ``(i, n)``: this run handles rows ``i, i + n, ...``.
    instruction : str
        The teacher's instruction; the transcript follows it (joined with
        ``transcript_separator``) or replaces a ``{transcript}`` field in
        it.  Use the training ``instruction`` of the recipe, so that the
        continuation answers the text-teacher prompt of training.
    system_prompt : str, optional
        System message; None keeps the chat template's default (SmolLM2
        then adds its own).  See :class:`~speechbrain_blspkd.prompt.
        PromptBuilder`; use the model's ``prompts.system_prompt``.
    transcript_separator : str
        Text joining the instruction and the transcript (the model's
        ``prompts.transcript_separator``).
    device : str or torch.device, optional
        Where the model runs (default: speechbrain's ``infer_device``).
    dtype : str
        ``"auto"`` (bfloat16 where ``device`` computes it fast, e.g. CPUs
        with AMX, else float32; :mod:`speechbrain_blspkd.utils.precision`),
        ``"bfloat16"`` or ``"float32"``.  The resolved dtype is part of the
        resume check: a run continues only with the same one (as are the
        model, instruction, system prompt, separator, ``max_new_tokens``,
        shard and input rows).
    stop_after_batches : int, optional
        Debugging aid for resume tests: kill this process (SIGKILL) right
        after that many batches were saved.

    Returns
    -------
    dict
        ``path`` (manifest written), ``generated`` (rows generated now),
        ``tokens`` (new tokens generated now), ``seconds``.

    Example
    -------
    >>> from speechbrain_blspkd.testing import save_toy_continuation_inputs
    >>> d = save_toy_continuation_inputs()
    >>> info = generate_continuations(d / "in.csv", d / "out.csv", d / "lm",
    ...     max_new_tokens=3, instruction="Repeat:", dtype="float32")
    >>> row = read_manifest(d / "out.csv")[0]
    >>> info["generated"], row["transcript"], row["truncated"] in ("0", "1")
    (1, 'hello world', True)
    """
    i, n = check_shard(shard)
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    rows = read_manifest(manifest_in)[i::n]
    device = device or sb.utils.distributed.infer_device()
    model, tokenizer, model_name = load_causal_lm(model_dir, device, dtype)
    builder = PromptBuilder(
        tokenizer,
        system_prompt=system_prompt,
        transcript_separator=transcript_separator,
    )
    meta = dict(
        model=model_name,
        instruction=instruction,
        system_prompt=system_prompt,
        transcript_separator=transcript_separator,
        max_new_tokens=max_new_tokens,
        dtype=str(resolve_dtype(dtype, device)).replace("torch.", ""),
        shard=[i, n],
        rows=_rows_hash(rows),
    )
    progress = progress_path(manifest_out, shard)
    progress.parent.mkdir(parents=True, exist_ok=True)
    done = open_progress(progress, meta)
    todo = [r for r in rows if r["ID"] not in done]
    logger.info(
        "continuations shard %d/%d: %d rows, %d done, %d to generate",
        i,
        n,
        len(rows),
        len(rows) - len(todo),
        len(todo),
    )
    # the text-teacher generation prompts of training and decoding
    prompts = builder.build_batch(
        instruction, transcripts=[r["transcript"] for r in todo]
    )
    stats = generate_greedy(
        model,
        tokenizer,
        todo,
        progress,
        prompts=[p.input_ids for p in prompts],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        stop_after_batches=stop_after_batches,
    )
    done = check_finished(progress, meta, rows)
    out_path = _shard_manifest_path(manifest_out, shard)
    write_manifest(out_path, [_out_row(r, done[r["ID"]]) for r in rows])
    stats["path"] = out_path
    return stats


def generate_on_all_ranks(manifest_in, manifest_out, **options):
    """:func:`generate_continuations` split across the ranks of a run.

    Call it on every rank (a collective).  Rank ``r`` of ``n`` generates
    shard ``(r, n)`` (resumable as ever: its progress file is its own), the
    rows travel through the process group
    (:func:`~speechbrain_blspkd.utils.distributed.all_gather`, never
    through files), the first process of every node writes the whole
    ``manifest_out`` atomically, and each rank then deletes its own shard
    files.  A rank whose node already has ``manifest_out`` contributes its
    shard's rows from that file instead of generating them; when every
    rank has it, nothing runs.  In one process this is
    :func:`generate_continuations`.

    Arguments
    ---------
    manifest_in : str or pathlib.Path
        Input manifest (on every node).
    manifest_out : str or pathlib.Path
        Output manifest, written on every node (each node may have its own
        folder).
    **options
        Passed to :func:`generate_continuations` (anything but ``shard``).

    Returns
    -------
    dict
        ``path`` (``manifest_out``), and this rank's ``generated`` rows,
        ``tokens`` and ``seconds``.

    Raises
    ------
    ValueError
        When an existing ``manifest_out`` holds other rows than
        ``manifest_in``.

    Example
    -------
    >>> from speechbrain_blspkd.testing import save_toy_continuation_inputs
    >>> d = save_toy_continuation_inputs()
    >>> opts = dict(model_dir=d / "lm", max_new_tokens=2, dtype="float32")
    >>> generate_on_all_ranks(d / "in.csv", d / "out.csv", **opts)["generated"]
    1
    >>> generate_on_all_ranks(d / "in.csv", d / "out.csv", **opts)["generated"]
    0
    """
    from speechbrain_blspkd.utils.distributed import (
        all_gather,
        gather_results,
        rank_world,
        shard,
        unshard,
    )

    if "shard" in options:
        raise ValueError("generate_on_all_ranks chooses the shards itself")
    out = pathlib.Path(manifest_out)
    rank, world = rank_world()
    have = all_gather(out.is_file())
    if all(have):
        return dict(path=out, generated=0, tokens=0, seconds=0.0)
    if world == 1:
        return generate_continuations(manifest_in, out, **options)

    def my_rows():
        if not have[rank]:
            stats = generate_continuations(
                manifest_in, out, shard=(rank, world), **options
            )
            return read_manifest(stats["path"]), stats
        done = read_manifest(out)
        wanted = [r["ID"] for r in read_manifest(manifest_in)]
        if [r["ID"] for r in done] != wanted:
            raise ValueError(
                f"{out} holds other rows than {manifest_in}; delete it to "
                "generate it again"
            )
        return shard(done, rank, world), dict(
            generated=0, tokens=0, seconds=0.0
        )

    parts = gather_results(my_rows)
    merged = unshard([rows for rows, _ in parts])
    stats = parts[rank][1]
    if not have[rank] and sb.utils.distributed.is_local_rank_zero():
        write_manifest(out, merged)
    sb.utils.distributed.ddp_barrier()  # the node's manifest is written
    if not have[rank]:
        for path in (
            _shard_manifest_path(out, (rank, world)),
            progress_path(out, (rank, world)),
        ):
            path.unlink(missing_ok=True)
    stats["path"] = out
    return stats


def merge_continuations(manifest_in, manifest_out, num_shards):
    """Join the progress files of ``num_shards`` shards into one manifest.

    Arguments
    ---------
    manifest_in : str or pathlib.Path
        The input manifest the shards were generated from.
    manifest_out : str or pathlib.Path
        The merged output manifest (rows in input order).
    num_shards : int
        Number of shards.

    Returns
    -------
    pathlib.Path
        ``manifest_out``.

    Raises
    ------
    RuntimeError
        If a shard is unfinished (names the shard and the missing count).
    """
    rows = read_manifest(manifest_in)
    merged = {}
    for i in range(num_shards):
        shard_rows = rows[i::num_shards]
        path = progress_path(manifest_out, (i, num_shards))
        if not path.is_file():
            raise RuntimeError(
                f"shard {i}/{num_shards} has not run: {path} missing"
            )
        meta = settings_line(path)
        if meta is None:
            raise RuntimeError(f"{path}: no settings header")
        if meta.get("rows") != _rows_hash(shard_rows):
            raise RuntimeError(
                f"{path}: written for other input rows than {manifest_in}"
            )
        done = load_progress(path, meta)
        missing = [r["ID"] for r in shard_rows if r["ID"] not in done]
        if missing:
            raise RuntimeError(
                f"shard {i}/{num_shards} is unfinished: {len(missing)} of "
                f"{len(shard_rows)} rows missing in {path}"
            )
        merged.update(done)
    write_manifest(manifest_out, [_out_row(r, merged[r["ID"]]) for r in rows])
    return pathlib.Path(manifest_out)


def main(argv=None):
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Teacher LLM continuations of manifest transcripts."
    )
    parser.add_argument("manifest_in")
    parser.add_argument("manifest_out")
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--shard", type=parse_shard, default=(0, 1))
    parser.add_argument(
        "--instruction",
        default=DEFAULT_INSTRUCTION,
        help="the teacher's instruction; the transcript follows it (or "
        "replaces a {transcript} field in it); default: %(default)r",
    )
    parser.add_argument(
        "--system-prompt",
        default=None,
        help="system message (default: the chat template's own)",
    )
    parser.add_argument(
        "--transcript-separator",
        default=" ",
        help="text between the instruction and the transcript "
        "(default: one space)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1 ... (default: speechbrain's infer_device, "
        "the GPU when there is one)",
    )
    parser.add_argument("--dtype", default="auto", choices=sorted(LLM_DTYPES))
    add_worker_options(
        parser,
        "torch CPU threads (default: torch's choice); 1 is faster when "
        "other jobs share the cores",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="merge the finished shards (n from --shard) into MANIFEST_OUT",
    )
    keywords = vars(parse_worker_args(parser, argv))
    del keywords["threads"]

    def run():
        if keywords.pop("merge"):
            path = merge_continuations(
                keywords["manifest_in"],
                keywords["manifest_out"],
                keywords["shard"][1],
            )
            return f"merged {keywords['shard'][1]} shards into {path}"
        info = generate_continuations(**keywords)
        rate = per(info["tokens"], info["seconds"])
        return (
            f"wrote {info['path']}: {info['generated']} rows generated, "
            f"{info['tokens']} tokens, {rate:.1f} tokens/s"
        )

    return report_run((RuntimeError, ValueError), run)


if __name__ == "__main__":
    sys.exit(main())
