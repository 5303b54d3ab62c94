"""The one exception type users see: a one-line message that names the culprit and what to do."""


class DsqError(Exception):
    """Bad input (file, tensor, flag, config). The CLI prints it as one line and exits non-zero."""
