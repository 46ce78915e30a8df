"""Could Whisper's own transcript give the CIF its count at inference?

Decodes each test clip greedily with Whisper's decoder over the cached
(dynamic-length) encoder features the adapter reads, so no second encoder
pass runs, and compares the LLM-token count of that transcript with the
reference's (exact-count rate, mean absolute error) and the word error
rate.  Kept in git history only (see RESULTS.md, 2026-12-06).

Usage::

    python asr_count.py DATA_FOLDER NUM_CLIPS
"""

import csv
import json
import pathlib
import re
import sys

import torch
from speechbrain.utils.edit_distance import wer_details_for_batch, wer_summary
from transformers import AutoTokenizer
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from speechbrain_blspkd.assets.fetch import asset_path
from speechbrain_blspkd.nnet.whisper_decoder import WhisperDecoderTeacher


@torch.no_grad()
def greedy(teacher, feats, max_tokens, end):
    """Greedy transcript of one clip's (T, d) encoder output."""
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    step, out = torch.tensor([teacher.prefix_ids("en")]), []
    for _ in range(max_tokens):
        o = teacher.decoder(
            input_ids=step,
            encoder_hidden_states=feats[None],
            past_key_values=cache,
            use_cache=True,
        )
        cache = o.past_key_values
        nxt = int(teacher.proj_out(o.last_hidden_state[:, -1]).argmax(-1))
        if nxt == end:
            break
        out.append(nxt)
        step = torch.tensor([[nxt]])
    return teacher.tokenizer.decode(out, skip_special_tokens=True).strip()


def main(data, num):
    teacher = WhisperDecoderTeacher("whisper-base")
    llm = AutoTokenizer.from_pretrained(
        str(asset_path("smollm2-135m-instruct"))
    )
    end = teacher.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    rows = {r["ID"]: r for r in csv.DictReader(open(data / "test.csv"))}
    files = sorted((data / "features.whisper-base").rglob("synth_test*.pt"))
    refs, hyps, exact, errors = [], [], 0, []
    for path in files[:num]:
        stored = torch.load(path)
        ref = rows[stored["uid"]]["transcript"]
        n_ref = len(llm(" " + ref.strip())["input_ids"])
        hyp = greedy(teacher, stored["feats"].float(), n_ref + 10, end)
        n_hyp = len(llm(" " + hyp)["input_ids"])
        exact += n_hyp == n_ref
        errors.append(abs(n_hyp - n_ref))
        refs.append(ref)
        hyps.append(hyp)
        print(stored["uid"], n_ref, n_hyp, hyp, flush=True)

    def words(s):
        return re.sub(r"[^a-z' ]", " ", s.lower()).split()

    details = wer_details_for_batch(
        list(range(len(refs))),
        [words(r) for r in refs],
        [words(h) for h in hyps],
    )
    print(
        json.dumps(
            dict(
                clips=len(refs),
                exact_count=exact / len(refs),
                mean_abs_count_error=sum(errors) / len(errors),
                wer=wer_summary(details)["WER"],
            )
        )
    )


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]), int(sys.argv[2]))
