"""The one exception type that means "the user's input cannot be used".

Tools print a UsageError as one line and exit 2; the server answers it with 400. Nothing else is translated:
any other exception is a bug, and keeps its traceback (CLLM_DEBUG=1 shows the traceback of a UsageError too).
It subclasses ValueError so that code which catches bad values in general keeps working.
"""


class UsageError(ValueError):
    """Bad flags, settings, prompts or files: the message says what is wrong, in one line."""
