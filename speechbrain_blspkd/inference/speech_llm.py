"""SpeechBrain inference interface of an exported speech LLM (any method).

:class:`SpeechLLM` loads a folder written by
:func:`speechbrain_blspkd.inference.export.export_model` (``hyperparams.yaml``
+ ``model.ckpt``; the bases are referenced by asset name or folder) and
answers spoken instructions. :meth:`SpeechLLM.generate_text` runs the same
LLM on a transcript with the same prompt builder (PLoRA off): the teacher
side of speech-vs-text parity.

Example
-------
>>> import tempfile, pathlib, numpy, soundfile
>>> from speechbrain_blspkd.inference.export import export_model
>>> from speechbrain_blspkd.testing import tiny_saved_speech_llm
>>> tmp = pathlib.Path(tempfile.mkdtemp())
>>> folder = export_model(tiny_saved_speech_llm(tmp), tmp / "model")
>>> llm = SpeechLLM.from_hparams(source=folder, run_opts={"device": "cpu"})
>>> soundfile.write(tmp / "a.wav", numpy.zeros(8000, "float32"), 16000)
>>> isinstance(llm.generate_file(tmp / "a.wav", max_new_tokens=3), str)
True

Authors
 * speechbrain-blspkd contributors 2025
"""

import torch
from speechbrain.inference.interfaces import Pretrained

from speechbrain_blspkd.dataio.audio import load_audio
from speechbrain_blspkd.inference.model_folder import (
    HPARAMS_FILE,
    check_model_folder,
)
from speechbrain_blspkd.prompt import context_limit

__all__ = ["SpeechLLM"]


class SpeechLLM(Pretrained):
    """A speech LLM answering spoken (or written) instructions.

    Build it with :meth:`from_hparams` from an exported folder. The
    ``hyperparams.yaml`` must define ``model`` (a
    :class:`~speechbrain_blspkd.models.speech_llm.SpeechLLMModel`, also in
    ``modules``), ``sample_rate``, ``max_audio_seconds`` and the generation
    defaults ``max_new_tokens`` and ``num_beams``.

    Arguments
    ---------
    *args, **kwargs
        See :class:`speechbrain.inference.interfaces.Pretrained`.

    Example
    -------
    Several clips are decoded as one batch: a padded tensor
    (:meth:`generate_batch`), waveforms of different lengths
    (:meth:`generate_waveforms`) or audio files (:meth:`generate_files`).

    >>> import tempfile, pathlib, numpy, soundfile
    >>> from speechbrain_blspkd.inference.export import (
    ...     export_model)
    >>> from speechbrain_blspkd.testing import tiny_saved_speech_llm
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> folder = export_model(tiny_saved_speech_llm(tmp), tmp / "model")
    >>> llm = SpeechLLM.from_hparams(source=folder,
    ...     run_opts={"device": "cpu"})
    >>> answers = llm.generate_batch(torch.randn(2, 8000) * 0.1,
    ...     torch.tensor([1.0, 0.5]), max_new_tokens=3)
    >>> len(answers)
    2
    >>> len(llm.generate_waveforms([torch.zeros(800), torch.zeros(400)],
    ...     max_new_tokens=2))
    2
    >>> for name, samples in [("a.wav", 8000), ("b.wav", 4000)]:
    ...     soundfile.write(tmp / name, numpy.zeros(samples), 16000)
    >>> answers = llm.generate_files([tmp / "a.wav", tmp / "b.wav"],
    ...     ["Repeat it.", "Say it again."], max_new_tokens=3)
    >>> len(answers), all(isinstance(a, str) for a in answers)
    (2, True)
    """

    HPARAMS_NEEDED = [
        "model",
        "sample_rate",
        "max_audio_seconds",
        "max_new_tokens",
        "num_beams",
    ]
    MODULES_NEEDED = ["model"]

    @classmethod
    def from_hparams(cls, source, hparams_file=HPARAMS_FILE, **kwargs):
        """Load an exported model folder (local only, no hub access).

        Arguments
        ---------
        source : str or pathlib.Path
            The folder written by
            :func:`~speechbrain_blspkd.inference.export.export_model`.
        hparams_file : str
            Hyperparameter file name in the folder.
        **kwargs
            Passed to speechbrain's ``pretrained_from_hparams``
            (``run_opts``, ``overrides``, ``savedir`` ...). Without
            ``savedir`` the files are read in place.

        Returns
        -------
        SpeechLLM

        Raises
        ------
        speechbrain_blspkd.inference.model_folder.ModelFolderError
            A file is missing or does not match ``export.json``.
        speechbrain_blspkd.models.trainable.WeightsMismatchError
            ``model.ckpt`` does not fit the model of ``hyperparams.yaml``.

        Example
        -------
        >>> import tempfile
        >>> SpeechLLM.from_hparams(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        speechbrain_blspkd.inference.model_folder.ModelFolderError: .../hyperparams.yaml: missing; ...
        """
        folder = check_model_folder(source, hparams_file)
        return super().from_hparams(
            str(folder.absolute()), hparams_file=hparams_file, **kwargs
        )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in self.MODULES_NEEDED:
            if name not in self.mods:
                raise ValueError(f"SpeechLLM: hparams `modules` lacks {name!r}")
        self.model = self.mods.model

    def _gen_kwargs(self, gen):
        gen = dict(gen)
        gen.setdefault("max_new_tokens", int(self.hparams.max_new_tokens))
        gen.setdefault("num_beams", int(self.hparams.num_beams))
        return gen

    def default_instruction(self, audio=True):
        """The instruction used when none is given.

        Arguments
        ---------
        audio : bool
            For a speech prompt (``audio_instruction`` when the model has
            one, else ``instruction``) or a text prompt (``instruction``).

        Returns
        -------
        str
        """
        return self.model._instructions(None, 1, audio=audio)[0]

    def load_file(self, path):
        """Load an audio file as the model expects it.

        Same checks as training (:func:`~speechbrain_blspkd.dataio.audio.
        load_audio`): missing / corrupt / zero-length / too long files raise
        :class:`~speechbrain_blspkd.dataio.audio.AudioError` naming the file;
        other rates are resampled (with a warning); channels are averaged.

        Arguments
        ---------
        path : str or pathlib.Path
            Audio file.

        Returns
        -------
        torch.Tensor
            (samples,) float32 on the CPU.
        """
        return load_audio(
            path,
            sample_rate=int(self.hparams.sample_rate),
            max_seconds=self.hparams.max_audio_seconds,
        )

    def generate_file(self, path, instruction=None, **gen):
        """The answer to one audio file.

        Arguments
        ---------
        path : str or pathlib.Path
            Audio file.
        instruction : str, optional
            Instruction of the speech prompt (default: the model's
            ``audio_instruction``, else ``instruction``).
        **gen
            Generation options (``max_new_tokens``, ``num_beams``, other
            ``transformers`` ``generate`` arguments).

        Returns
        -------
        str

        Raises
        ------
        speechbrain_blspkd.prompt.ContextLengthError
            The speech prompt (instruction + the adapter's predicted token
            count) plus ``max_new_tokens`` does not fit in the LLM context;
            the message names the file.
        """
        return self.generate_files([path], instruction, **gen)[0]

    def generate_files(self, paths, instructions=None, **gen):
        """Answers to several audio files, decoded as one batch.

        Arguments
        ---------
        paths : list of str or pathlib.Path
            Audio files (all are checked before decoding).
        instructions : str or list of str, optional
            One instruction, or one per file.
        **gen
            Generation options, as for :meth:`generate_file`.

        Returns
        -------
        list of str
            An answer per file (see the class example).

        Raises
        ------
        speechbrain_blspkd.prompt.ContextLengthError
            See :meth:`generate_file`.
        """
        wavs = [self.load_file(p) for p in paths]
        names = [str(p) for p in paths]
        return self.generate_waveforms(wavs, instructions, names, **gen)

    def generate_waveforms(self, wavs, instructions=None, names=None, **gen):
        """Answers to waveforms of different lengths, decoded as one batch.

        What :meth:`generate_files` does after loading: the waveforms are
        right-padded into one batch (the batch command line and the
        browser demo load and check each file themselves, then call this).

        Arguments
        ---------
        wavs : list of torch.Tensor
            (samples,) waveforms at ``sample_rate`` (e.g. from
            :meth:`load_file`).
        instructions : str or list of str, optional
            One instruction, or one per waveform.
        names : list of str, optional
            How each waveform is named in a context-length error (file
            names; default: its index in the batch).
        **gen
            Generation options, as for :meth:`generate_file`.

        Returns
        -------
        list of str
            An answer per waveform (see the class example).
        """
        from speechbrain.utils.data_utils import batch_pad_right

        if not len(wavs):
            return []
        batch, lens = batch_pad_right([w.float() for w in wavs])
        if names is not None:
            names = [str(n) for n in names]
        return self._generate(batch, lens, instructions, gen, names)

    def generate_batch(self, wavs, wav_lens=None, instructions=None, **gen):
        """Answers to a padded batch of waveforms.

        Arguments
        ---------
        wavs : torch.Tensor
            (B, S) waveforms at ``sample_rate`` (a (S,) tensor is one clip).
        wav_lens : torch.Tensor, optional
            (B,) relative lengths (default: all 1).
        instructions : str or list of str, optional
            One instruction, or one per clip.
        **gen
            Generation options, as for :meth:`generate_file`.

        Returns
        -------
        list of str
            An answer per clip.

        Raises
        ------
        speechbrain_blspkd.prompt.ContextLengthError
            A clip's speech prompt plus ``max_new_tokens`` does not fit in
            the LLM context (the message gives its index in the batch).
        """
        return self._generate(wavs, wav_lens, instructions, gen)

    def _generate(self, wavs, wav_lens, instructions, gen, names=None):
        """Decode a padded batch; a context-length error names the clip's
        file (``names``) or, without names, its index in the batch."""
        if wavs.dim() == 1:
            wavs = wavs[None]
        if wavs.dim() != 2:
            raise ValueError(
                f"generate_batch: `wavs` must be (B, S), got "
                f"{tuple(wavs.shape)}"
            )
        if wav_lens is None:
            wav_lens = torch.ones(wavs.shape[0])
        wav_lens = torch.as_tensor(wav_lens, dtype=torch.float32)
        limit = self.hparams.max_audio_seconds
        if limit is not None:
            seconds = float(wav_lens.max()) * wavs.shape[1]
            seconds /= int(self.hparams.sample_rate)
            if seconds > limit + 1e-6:
                raise ValueError(
                    f"generate_batch: {seconds:.1f} s of audio is longer than "
                    f"max_audio_seconds={limit:g}; split it first"
                )
        wavs = wavs.to(self.device, torch.float32)
        wav_lens = wav_lens.to(self.device)
        gen = self._gen_kwargs(gen)
        return self.model.generate(
            wavs,
            wav_lens,
            instructions=instructions,
            names=names,
            item="clip" if names is None else "file",
            **gen,
        )

    def generate_text(self, text, instruction=None, **gen):
        """The same LLM answering a transcript (the teacher, PLoRA off).

        Arguments
        ---------
        text : str or list of str
            Transcript(s).
        instruction : str or list of str, optional
            Text instruction (default: the model's ``instruction``).
        **gen
            Generation options.

        Returns
        -------
        str (list of str when ``text`` is a list)

        Raises
        ------
        speechbrain_blspkd.prompt.ContextLengthError
            A text prompt plus ``max_new_tokens`` does not fit in the LLM
            context (the message gives the text's index).
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        gen = self._gen_kwargs(gen)
        self.model.prompts.check_fits(
            context_limit(self.model.llm),
            self.model._instructions(instruction, len(texts)),
            transcripts=texts,
            max_new_tokens=gen["max_new_tokens"],
            item="text",
        )
        out = self.model.generate_text(texts, instructions=instruction, **gen)
        return out[0] if single else out

    def forward(self, wavs, wav_lens=None, instructions=None, **gen):
        """Same as :meth:`generate_batch`."""
        return self.generate_batch(wavs, wav_lens, instructions, **gen)
