"""The error lorite raises for bad user input (a ValueError, so library callers can catch it as one)."""


class LoriteError(ValueError):
    """Bad input: an unknown task, optimizer or model, an unparsable option, an occupied output dir…

    The CLI prints its message as one line and exits with code 2.
    """
