"""The service's client errors: what every endpoint and the upload reader raise.

Apart from :class:`paligemma_xray.errors.PaligemmaXrayError` (a command-line user's mistake,
exit 2), an :class:`ApiError` is an HTTP client's mistake: the app turns it into a JSON
``{"error": {"code", "message"}}`` response with its status.
"""

from __future__ import annotations


class ApiError(Exception):
    """A request the client can fix: HTTP status, a stable code and a readable message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        super().__init__(message)
