"""Shared pieces of the benchmarks: clocks, FLOP counts, the machine, models.

Every benchmark times its configurations **in the same run**, alternating
them round by round so that load on a shared machine hits them alike, and
keeps the minimum over rounds (load only ever adds time) with the median
beside it. Speeds are quoted as ratios of figures measured together.

FLOPs are counted by executing the step once under
:class:`torch.utils.flop_counter.FlopCounterMode` (matrix products,
convolutions and attention, forward and backward), not from a formula, so
the count follows the code: a logit computed needlessly is counted, and an
achieved FLOP/s figure is the executed matrix work per second.
"""

import contextlib
import dataclasses
import os
import pathlib
import platform
import resource
import statistics
import time

import torch

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "It is amazing how nice people are to you when you are going away.",
    "Beware of all enterprises that require new clothes.",
    "The time for action is past, and now is the time for thought.",
    "A private sin is not so prejudicial as a public indecency.",
    "Soap and education are not as sudden as a massacre.",
    "Gandhi often changed his mind publicly.",
    "One meets his destiny often on the road he takes to avoid it.",
]
CONTINUATION = (
    "This sentence reminds us that small choices shape the course of a "
    "life, and that what we avoid often finds us anyway."
)
INSTRUCTION = "Continue the following text in a coherent style:"
SAMPLE_RATE = 16000
SPEECH_TEXT = (
    "The time for action is past, and now is the time for thought. Beware "
    "of all enterprises that require new clothes."
)


def speech_clip(seconds, folder):
    """A ``seconds``-long clip of espeak-ng speech (tiled), float32."""
    import soundfile as sf

    from speechbrain_blspkd.dataprep.tts import synthesise

    path = pathlib.Path(folder) / "speech.wav"
    if not path.is_file():
        synthesise(SPEECH_TEXT, path)
    wav, rate = sf.read(str(path), dtype="float32")
    assert rate == SAMPLE_RATE
    need = int(seconds * SAMPLE_RATE)
    reps = need // len(wav) + 1
    return torch.from_numpy(wav).repeat(reps)[:need]


def cpu_model():
    """The CPU's model name (``lscpu``'s "Model name"), or the platform."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine():
    """What a figure was measured on: CPU, cores, threads, torch, device."""
    info = {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def sync(device):
    """Waits for queued device work (CUDA) before reading the clock."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device="cpu"):
    """Wall time of one ``fn()`` call in seconds, and its result."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


@dataclasses.dataclass
class Timing:
    """Seconds of each round of one configuration."""

    seconds: list

    @property
    def best(self):
        """The least disturbed round."""
        return min(self.seconds)

    @property
    def median(self):
        """The median round."""
        return statistics.median(self.seconds)


def compare(configs, rounds, device="cpu", warmup=1):
    """Time named configurations alternately, ``rounds`` times each.

    Arguments
    ---------
    configs : dict
        Name -> callable (no arguments).
    rounds : int
        Timed calls per configuration.
    device : str or torch.device
        Synchronised before each reading (CUDA).
    warmup : int
        Untimed calls per configuration first.

    Returns
    -------
    dict
        Name -> :class:`Timing`.

    Example
    -------
    >>> t = compare({"a": lambda: sum(range(10)), "b": lambda: 1}, rounds=2)
    >>> sorted(t), len(t["a"].seconds)
    (['a', 'b'], 2)
    """
    for fn in configs.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in configs}
    for _ in range(rounds):
        for name, fn in configs.items():
            times[name].append(timed(fn, device)[0])
    return {name: Timing(t) for name, t in times.items()}


def count_flops(fn):
    """Executed FLOPs of one ``fn()`` call (matmuls, convs, attention).

    Example
    -------
    >>> a, b = torch.ones(4, 8), torch.ones(8, 2)
    >>> count_flops(lambda: a @ b)
    128
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def peak_rss_mib():
    """Peak resident memory of this process so far (MiB).

    Linux: ``VmHWM`` of ``/proc/self/status`` (reset by ``exec``, unlike
    ``getrusage``'s ``ru_maxrss``, which a child started by ``subprocess``
    inherits from its parent); elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if platform.system() == "Darwin":
        return peak / 2**20
    return peak / 2**10


def autocast(device, dtype):
    """Autocast context for ``dtype`` (nothing for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def llm_path():
    """The SmolLM2-135M-Instruct asset (fetched and converted on first use)."""
    from speechbrain_blspkd.assets import asset_path

    return str(asset_path("smollm2-135m-instruct"))


def encoder_path():
    """The Whisper-base asset (fetched and converted on first use)."""
    from speechbrain_blspkd.assets import asset_path

    return str(asset_path("whisper-base"))


def demo_adapter(frame_stride=None):
    """A randomly initialised CFormer of the demo's configuration, built
    from the arguments ``recipes/SynthSpeech/speech_llm/hparams/
    blsp_kd.yaml`` gives its ``adapter`` (so it follows the shipped YAML);
    ``frame_stride`` overrides the YAML's. Speed does not depend on
    training."""
    from benchmarks.budget import recipe_arguments
    from speechbrain_blspkd.nnet.cformer import CFormer

    arguments = recipe_arguments("adapter")
    if frame_stride is not None:
        arguments["frame_stride"] = frame_stride
    return CFormer(**arguments)


def demo_model(dtype, device, encoder=False, prefix_reuse=True):
    """The demo's speech LLM (SmolLM2-135M, PLoRA r=16, random CFormer),
    optionally with the Whisper-base encoder for raw audio."""
    from speechbrain_blspkd.models.speech_llm import SpeechLLMModel
    from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder

    enc = None
    if encoder:
        enc = WhisperEncoder(encoder_path(), freeze=True, dtype=dtype)
    model = SpeechLLMModel(
        llm_path(),
        demo_adapter(),
        encoder=enc,
        instruction=INSTRUCTION,
        plora={"r": 16, "alpha": 16, "dropout": 0.05, "scope": "audio"},
        llm_dtype=dtype,
        prefix_reuse=prefix_reuse,
    )
    return model.to(device)


def aura_model(dtype, device):
    """AuRA's exported model as served: Whisper's log-mel front end (no
    weights) -> a random AudioEmbedding (stride 4, 25 positions/s) ->
    SmolLM2-135M with PLoRA r=16 (aura.yaml); no speech encoder."""
    from speechbrain_blspkd.models.speech_llm import SpeechLLMModel
    from speechbrain_blspkd.nnet.audio_embedding import AudioEmbedding
    from speechbrain_blspkd.nnet.whisper_encoder import WhisperLogMel

    model = SpeechLLMModel(
        llm_path(),
        AudioEmbedding(80, 576, stride=4, out_init_std=0.136),
        encoder=WhisperLogMel(n_mels=80),
        instruction=INSTRUCTION,
        plora={"r": 16, "alpha": 16, "dropout": 0.05, "scope": "audio"},
        llm_dtype=dtype,
        prefix_reuse=True,
    )
    return model.to(device)


def _distinct_parameters(modules):
    """The parameters of ``modules``, each shared tensor once."""
    seen = {}
    for module in modules:
        for param in module.parameters():
            seen[param.data_ptr()] = param
    return seen.values()


def parameter_count(*modules):
    """Parameters of the modules together (shared tensors counted once)."""
    return sum(p.numel() for p in _distinct_parameters(modules))


def parameter_bytes(*modules):
    """Bytes of the modules' parameters (shared tensors counted once).

    Example
    -------
    >>> import torch
    >>> parameter_bytes(torch.nn.Linear(3, 2))  # 8 float32 values
    32
    """
    return sum(
        p.numel() * p.element_size() for p in _distinct_parameters(modules)
    )


def texts(n):
    """``n`` benchmark transcripts (the sentences repeated)."""
    return (SENTENCES * (n // len(SENTENCES) + 1))[:n]
