"""One exception type for problems caused by the user's input; the CLI maps it to exit code 2."""


class UserError(Exception):
    """Bad input: a missing or malformed model, an unknown pass, a bad option value.

    The message is a single line meant for the end user; the CLI prints it as
    ``onnxslim: error: <message>`` and exits with status 2 without writing any output.
    """

    exit_code = 2

    def __init__(self, message: str):
        # Keep messages to one line: multi-line library errors are cut to their first line.
        first = str(message).strip().splitlines()[0] if str(message).strip() else "unknown error"
        super().__init__(first)
