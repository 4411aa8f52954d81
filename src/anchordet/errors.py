"""The error a user fixes by changing a config value: the message names the key and the value.

Entry points show it as one line (``error: format='tflite': use one of ...``) without the traceback
that would bury it; a plain ``ValueError`` from deeper down still shows its traceback, since there
the stack is what explains it.
"""


class ConfigError(ValueError):
    """A config value (or the file it names) cannot be used; the message says which and why."""
