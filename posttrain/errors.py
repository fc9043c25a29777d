"""The one exception type users see as a one-line message (exit code 2), never as a traceback."""


class PosttrainError(Exception):
    """A problem with the user's input or environment: bad file, unknown model, missing package."""
