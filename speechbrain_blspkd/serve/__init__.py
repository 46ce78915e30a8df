"""``blspkd-serve``: an OpenAI-compatible HTTP endpoint for exported models.

* :mod:`~speechbrain_blspkd.serve.app`: the FastAPI app
  (``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``) and
  its request schema;
* :mod:`~speechbrain_blspkd.serve.batcher`: the dynamic batcher that decodes
  concurrent requests together and streams each its own tokens;
* :mod:`~speechbrain_blspkd.serve.audio`: base64 ``input_audio`` decoding;
* :mod:`~speechbrain_blspkd.serve.cli`: the ``blspkd-serve`` command.

FastAPI and uvicorn come with the ``serve`` (or ``demo``) extra:
``pip install 'speechbrain_blspkd[serve]'``. Importing this package loads
none of them.
"""

SERVE_EXTRA_HINT = (
    "the server needs fastapi and uvicorn: "
    "pip install 'speechbrain_blspkd[serve]'"
)
