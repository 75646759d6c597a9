"""The errors DLM raises, one tree for all layers.

DLMError                      anything DLM reports to a user (one clear line)
+-- UserInputError            bad input: nothing was changed
|   +-- InvalidValueError     a bad phase, lifetime, size, tier, kind...: what every input
|       |                     model (lifecycle.catalogue.inputs) raises, so an edge catches one type
|       +-- InvalidNameError      a name or path that escapes its root, NUL, control chars
|       +-- InvalidFilterError    a malformed --where expression
|       +-- InvalidMetadataError  bad --meta / --meta-json
+-- NotFoundError
|   +-- ItemNotFoundError
|   +-- StorageNotFoundError
|   +-- DatasetNotFoundError
|   +-- SourceNotFoundError   a file to ingest that does not exist
+-- ConflictError             a duplicate name, a state that forbids the action
+-- PolicyViolationError      the action would break the lifecycle invariant
+-- StorageError              a storage refused or failed an operation (permanent)
|   +-- CredentialsError      missing or wrong credentials
|   +-- RootNotFoundError     a storage's root (directory, bucket, remote path) does not exist;
|                             also a NotFoundError: the name given points nowhere
+-- UnreadableFileError       a file DLM may not or cannot read (permission denied, I/O error)
+-- TransientError            what a retry may fix: timeouts, a storage briefly gone
    +-- StorageUnavailableError
"""

from lifecycle.redact import redact


class DLMError(Exception):
    """Base of every error DLM reports; its message is one line for the user, with the password
    of any URL in it redacted (lifecycle.redact)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class UserInputError(DLMError):
    pass


class InvalidValueError(UserInputError):
    pass


class InvalidNameError(InvalidValueError):
    pass


class InvalidFilterError(InvalidValueError):
    pass


class InvalidMetadataError(InvalidValueError):
    pass


class NotFoundError(DLMError):
    pass


class ItemNotFoundError(NotFoundError):
    pass


class StorageNotFoundError(NotFoundError):
    pass


class DatasetNotFoundError(NotFoundError):
    pass


class SourceNotFoundError(NotFoundError):
    pass


class ConflictError(DLMError):
    pass


class PolicyViolationError(DLMError):
    pass


class StorageError(DLMError):
    pass


class CredentialsError(StorageError):
    pass


class RootNotFoundError(StorageError, NotFoundError):
    pass


class UnreadableFileError(DLMError):
    pass


class TransientError(DLMError):
    pass


class StorageUnavailableError(TransientError):
    pass
