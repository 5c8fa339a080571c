"""The one exception hierarchy of vmfs-crypt: messages are written for users, each class has a CLI exit code."""


class VmfsCryptError(Exception):
    """Base of every error vmfs-crypt reports to a user."""

    exit_code = 1


class UsageError(VmfsCryptError):
    """The command line or its arguments are wrong."""

    exit_code = 2


class ConfigError(VmfsCryptError):
    """The configuration file or a provider's settings are wrong."""

    exit_code = 3


class ProviderError(VmfsCryptError):
    """A key provider cannot give a key (missing, unreachable, revoked)."""

    exit_code = 4


class KeyNotFoundError(ProviderError):
    """The provider has no key with the requested id."""


class KeyUnwrapError(VmfsCryptError):
    """A wrapped DEK does not open under its KEK: wrong key or tampered metadata."""

    exit_code = 5


class FormatError(VmfsCryptError):
    """On-disk metadata is malformed, of an unknown version, or uses unknown features."""

    exit_code = 6


class AgentError(VmfsCryptError):
    """The key agent cannot be reached or refused a request."""

    exit_code = 7


class MountError(VmfsCryptError):
    """A mount or unmount failed."""

    exit_code = 8


class DataError(VmfsCryptError):
    """Encrypted data is damaged or incomplete (e.g. a truncated extent)."""

    exit_code = 9


class KeyFilePermissionError(ConfigError):
    """A key file can be read by others than its owner."""
