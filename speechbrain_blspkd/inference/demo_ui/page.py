"""The demo's page (gradio, the optional ``demo`` extra: ``pip install
'speechbrain_blspkd[demo]'``), where a person records from the microphone
or uploads a file, chooses or types an instruction, and presses *Answer*:

* each model's answer to the speech streams in token by token (the text
  shown at the end is exactly what :meth:`SpeechLLM.generate_file
  <speechbrain_blspkd.inference.speech_llm.SpeechLLM.generate_file>` gives
  for the same file and instruction);
* beside it, the cascade: Whisper's transcript of the clip and what the
  same LLM answers to that transcript as text
  (:meth:`SpeechLLM.generate_text`), so one sees at a glance what the
  speech model heard;
* for a model whose adapter integrates and fires (CIF), the CIF weights
  over the waveform, each fired token marked and labelled with the LLM
  token nearest to its embedding, and, once Whisper's transcript is there,
  thin green lines where each LLM token of the transcript starts
  (:mod:`~speechbrain_blspkd.inference.demo_ui.cif`).

Several models are compared side by side, one column each.  Bad input
gets a clear message on the page (``#status``).  What the page does, it
asks of a :class:`~speechbrain_blspkd.inference.demo_ui.backend.DemoBackend`.
"""

#: Instructions offered besides the models' own (typing another works too).
EXTRA_INSTRUCTIONS = (
    "Repeat the following text exactly:",
    "Continue the following text in a coherent style:",
    "Answer the question.",
    "Summarise what is said in one sentence.",
)

CSS = """
#status {min-height: 2.2em; font-size: 1.05em}
.answer textarea {font-size: 1.05em}
"""


def build_app(backend, instructions=()):
    """The gradio page around ``backend``.

    Arguments
    ---------
    backend : DemoBackend
        The models.
    instructions : sequence of str
        Instructions offered first in the list (the models' own are added).

    Returns
    -------
    gradio.Blocks
    """
    import gradio as gr

    choices = []
    for text in (
        list(instructions)
        + [llm.default_instruction() for _, llm in backend.models]
        + list(EXTRA_INSTRUCTIONS)
    ):
        if text and text not in choices:
            choices.append(text)
    limit = backend.max_seconds
    limit_text = f" (at most {limit:g} s)" if limit else ""
    with gr.Blocks(
        title="speechbrain-blspkd: talk to it", analytics_enabled=False
    ) as app:
        gr.Markdown(
            "# Talk to it\n"
            "Record from the microphone or upload a clip" + limit_text + ", "
            "choose or type an instruction, then press **Answer**. Each "
            "speech model answers the audio; beside it, the same LLM "
            "answers Whisper's transcript (the cascade)."
        )
        with gr.Row():
            audio = gr.Audio(
                sources=["upload", "microphone"],
                type="filepath",
                label="Speech",
                elem_id="audio",
                scale=3,
            )
            with gr.Column(scale=2):
                instruction = gr.Dropdown(
                    choices=choices,
                    value=choices[0],
                    allow_custom_value=True,
                    label="Instruction (choose or type)",
                    elem_id="instruction",
                )
                button = gr.Button(
                    "Answer", variant="primary", elem_id="answer"
                )
        status = gr.Markdown("Waiting for a clip.", elem_id="status")
        transcript = gr.Textbox(
            label="Whisper transcript (what was said, as Whisper heard it)",
            elem_id="transcript",
            interactive=False,
            visible=backend.transcriber is not None,
        )
        outputs = [status, transcript]
        with gr.Row(equal_height=False):
            for i, (label, _) in enumerate(backend.models):
                with gr.Column():
                    gr.Markdown(f"### {label}")
                    with gr.Row():
                        answer = gr.Textbox(
                            label="Answer to the speech",
                            elem_id=f"answer-{i}",
                            elem_classes=["answer"],
                            interactive=False,
                            lines=4,
                        )
                        cascade = gr.Textbox(
                            label="Same LLM answering Whisper's transcript "
                            "(cascade)",
                            elem_id=f"cascade-{i}",
                            elem_classes=["answer"],
                            interactive=False,
                            lines=4,
                            visible=backend.transcriber is not None,
                        )
                    plot = gr.Image(
                        label="CIF weights over the waveform, fired tokens "
                        "(nearest LLM token)",
                        type="filepath",
                        elem_id=f"cif-{i}",
                        interactive=False,
                        visible=backend.has_cif[i],
                    )
                    outputs += [answer, cascade, plot]

        def respond(path, text):
            for state in backend.respond(path, text):
                values = [state["status"], state["transcript"]]
                for i in range(len(backend.models)):
                    plot = state["plots"][i]
                    values += [
                        state["answers"][i],
                        state["cascade"][i],
                        None if plot is None else str(plot),
                    ]
                yield values

        button.click(respond, inputs=[audio, instruction], outputs=outputs)
    return app


def theme():
    """The default look without web fonts (the page works offline)."""
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    mono = ["ui-monospace", "monospace"]
    return gr.themes.Default(font=system, font_mono=mono)
