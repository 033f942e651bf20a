"""The error lorite raises for bad user input (a ValueError, so library callers can catch it as one)."""


class LoriteError(ValueError):
    """Bad input: an unknown task, optimizer or model, an unparsable option, an occupied output dir…

    The CLI prints its message as one line and exits with code 2.
    """


class DamagedArtifact(LoriteError):
    """A saved artefact that cannot be used as it is: a checkpoint whose files are missing, truncated or
    changed since they were written (a manifest's size or sha256 disagrees), or that does not parse.

    The message names the file, what is wrong with it and what to do; the CLI prints it as one line and
    exits with code 1 (a failure at run time, not bad usage).
    """
