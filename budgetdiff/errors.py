"""The library's request error: the field at fault as data, not as a string prefix.

Every edge that receives a request (the HTTP ingress, the command line, a Python call) maps a
``RequestError`` by its ``field``: the ingress answers 400 with ``param=field``, the command line
names the flag for the field, the registry pyfunc names the input column. Nobody parses
``"field: ..."`` out of a message.
"""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine cannot serve.

    Args:
        field: the request field at fault, in the API's vocabulary (``prompt``, ``mode``, ``steps``,
            ``quality_target``, ``scheduler``, ``guidance``, ``seed``, ``skip``; see docs/engine.md).
        message: what is wrong with it, without the field name.
        index: the request's position when it came in a list of several, else None.

    ``str(error)`` is ``"field: message"`` (plus ``" (request i)"`` with an index): the one line a
    caller shows.
    """

    def __init__(self, field: str, message: str, index: int | None = None):
        self.field, self.message, self.index = field, message, index
        super().__init__(self._line())

    def _line(self) -> str:
        where = f" (request {self.index})" if self.index is not None else ""
        return f"{self.field}: {self.message}{where}"

    def at(self, index: int) -> "RequestError":
        """The same error for the request at ``index`` of a list."""
        return RequestError(self.field, self.message, index)

    def __reduce__(self):  # pickles through Ray with its fields
        return (RequestError, (self.field, self.message, self.index))
