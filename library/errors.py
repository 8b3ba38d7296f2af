"""Errors that mean "the user's input cannot be honoured".

Entry points catch :class:`UserError` and print its message alone (no traceback) before
exiting non-zero: the message itself must name the file, key or flag at fault and say what to do.
"""


class UserError(Exception):
    """Input that cannot be honoured; the message is shown to the user as is."""


class CheckpointError(UserError):
    """A model or LoRA file that is missing, unreadable, or not what it was given as."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped a run at a step boundary; the message says what was saved where."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
