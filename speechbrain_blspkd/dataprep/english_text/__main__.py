"""Command line of the English sentence sources.

``python -m speechbrain_blspkd.dataprep.english_text --count`` prints the
clean sentences per source
(:mod:`~speechbrain_blspkd.dataprep.english_sources`) and in total;
``--coverage LLM`` the LLM-token coverage of the test sentences of the
English plan by its training sentences (:mod:`.coverage`).
"""

import argparse
import sys

from speechbrain_blspkd.dataprep.english_sources import (
    SOURCES,
    english_sentences,
    missing_sources,
    source_sentences,
)
from speechbrain_blspkd.dataprep.english_text.coverage import (
    llm_tokenize,
    plan_coverage,
)
from speechbrain_blspkd.dataprep.sentences import sentence_key


def main(argv=None):
    """Command line: ``--count`` prints the sentences per source."""
    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_blspkd.dataprep.english_text",
        description="English sentence sources of SynthSpeech.",
    )
    parser.add_argument(
        "--count",
        action="store_true",
        help="print the distinct clean sentences per source and in total",
    )
    parser.add_argument(
        "--coverage",
        metavar="LLM",
        help="print the LLM-token coverage of the test sentences of the "
        "English plan (num_valid 32, num_test 96, seed 1234) by the "
        "training sentences of num_train 2000/4000/8000/20000, for the "
        "full pool and the core fortunes only (LLM: an asset name or a "
        "folder, e.g. smollm2-135m-instruct)",
    )
    args = parser.parse_args(argv)
    if args.coverage:
        tokenize = llm_tokenize(args.coverage)
        core = {"en": source_sentences("fortunes")}
        for name, kw in [
            ("all sources", {}),
            ("fortunes only", {"sentences": core}),
        ]:
            for r in plan_coverage(tokenize, [2000, 4000, 8000, 20000], **kw):
                print(
                    f"{name:14s} num_train {r['num_train']:6d}  distinct "
                    f"{r['distinct_train']:6d}  token coverage "
                    f"{100 * r['token_coverage']:.2f} %  type coverage "
                    f"{100 * r['type_coverage']:.2f} %"
                )
        return 0
    if not args.count:
        parser.print_help()
        return 0
    missing = missing_sources()
    if missing:
        print(f"missing Debian packages: {' '.join(missing)}")
    seen = set()
    for name in SOURCES:
        sents = source_sentences(name)
        keys = {sentence_key(s) for s in sents}
        new = len(keys - seen)
        seen |= keys
        print(f"{name:16s} {len(sents):7d}  (new after the above: {new})")
    print(f"{'total':16s} {len(english_sentences()):7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
