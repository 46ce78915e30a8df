"""Test helpers: tiny random models, test tokenizers, fake audio, processes.

Not part of the library's public API: the factories here exist for tests,
doctests and benchmarks only, and no library module imports them outside
its doctest examples.  Import them from this package
(``from speechbrain_blspkd.testing import tiny_speech_llm``); by
concept they live in:

* :mod:`~speechbrain_blspkd.testing.models`: tiny random models and
  the sizes they share;
* :mod:`~speechbrain_blspkd.testing.tokenizers`: test tokenizers;
* :mod:`~speechbrain_blspkd.testing.audio`: speech-like clips, their
  manifests, and whether piper can run;
* :mod:`~speechbrain_blspkd.testing.processes`: multi-node launch
  rehearsals, commands run together, recipe scripts loaded by path.
"""

from speechbrain_blspkd.testing.audio import (
    piper_unavailable,
    write_clip_folder,
    write_speech_manifest,
    write_speechlike_wav,
)
from speechbrain_blspkd.testing.models import (
    count_llm_calls,
    save_toy_continuation_inputs,
    save_toy_llm,
    tiny_aura,
    tiny_brain,
    tiny_cascade,
    tiny_language_aware_qformer,
    tiny_llm_config,
    tiny_saved_speech_llm,
    tiny_speech_llm,
    tiny_whisper_config,
    tiny_whisper_model,
)
from speechbrain_blspkd.testing.processes import (
    load_script,
    run_together,
    torchrun_node,
)
from speechbrain_blspkd.testing.tokenizers import (
    CHATML_TEMPLATE,
    DOCTEST_TOKENIZERS,
    build_test_tokenizer,
    build_test_whisper_tokenizer,
    doctest_tokenizer,
    toy_word_tokenizer,
    whisper_token_settings,
)

__all__ = [
    "CHATML_TEMPLATE",
    "DOCTEST_TOKENIZERS",
    "build_test_tokenizer",
    "build_test_whisper_tokenizer",
    "count_llm_calls",
    "doctest_tokenizer",
    "load_script",
    "piper_unavailable",
    "run_together",
    "save_toy_continuation_inputs",
    "save_toy_llm",
    "tiny_aura",
    "tiny_brain",
    "tiny_cascade",
    "tiny_language_aware_qformer",
    "tiny_llm_config",
    "tiny_saved_speech_llm",
    "tiny_speech_llm",
    "tiny_whisper_config",
    "tiny_whisper_model",
    "torchrun_node",
    "toy_word_tokenizer",
    "whisper_token_settings",
    "write_clip_folder",
    "write_speech_manifest",
    "write_speechlike_wav",
]
