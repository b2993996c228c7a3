"""User-facing errors: one line that says what was wrong and what would work."""


class PrunekitError(Exception):
    """An error caused by the user's input. The CLI prints it as one line, without a traceback."""


class StopForward(Exception):
    """Raised inside a forward pass to stop it once the inputs we need are captured."""
