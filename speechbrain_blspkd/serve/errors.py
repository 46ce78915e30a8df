"""Errors the server answers with an OpenAI-style error object.

Example
-------
>>> err = ServeError(404, "model 'x' is not loaded", param="model",
...     code="model_not_found")
>>> err.body()["error"]["type"], err.status
('not_found_error', 404)
"""

__all__ = ["ServeError"]

_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


class ServeError(Exception):
    """A request the server refuses (or fails), with its HTTP status.

    Arguments
    ---------
    status : int
        HTTP status (400 bad value, 404 unknown model, 413 too large,
        422 malformed request, 500 the model failed).
    message : str
        What is wrong, for the client.
    param : str, optional
        The request field at fault (e.g. ``messages[0].content[1]``).
    code : str, optional
        A short machine-readable code (``invalid_base64``, ``not_audio``,
        ``silent_audio``, ``audio_too_long``, ``model_not_found``,
        ``context_length_exceeded`` ...).
    """

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status = int(status)
        self.message = str(message)
        self.param = param
        self.code = code

    def body(self):
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }
