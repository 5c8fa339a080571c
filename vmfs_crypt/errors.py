"""The one exception hierarchy of vmfs-crypt and the CLI's exit codes: messages are written for users.

Each error class has a stable `code` (it crosses the agent's socket and the ready pipe of
child processes, so a client raises the same class the server did) and an `exit_code`
from `ExitCode`.
"""

import enum


class ExitCode(enum.IntEnum):
    """Every exit status of the `vmfs-crypt` command (README, "Exit codes")."""

    OK = 0
    ERROR = 1
    USAGE = 2
    CONFIG = 3
    PROVIDER = 4
    KEY_UNWRAP = 5
    FORMAT = 6
    AGENT = 7
    MOUNT = 8
    DATA = 9
    OS_ERROR = 10
    IN_USE = 11
    PERMISSION = 12
    LOCKED = 13  # `status`: the agent runs, but some disks are locked (their KEK could not be fetched)
    INTERRUPTED = 130


class VmfsCryptError(Exception):
    """Base of every error vmfs-crypt reports to a user."""

    code = "error"
    exit_code = ExitCode.ERROR


class UsageError(VmfsCryptError):
    """The command line or its arguments are wrong."""

    code = "usage"
    exit_code = ExitCode.USAGE


class ConfigError(VmfsCryptError):
    """The configuration file or a provider's settings are wrong."""

    code = "config"
    exit_code = ExitCode.CONFIG


class KeyFilePermissionError(ConfigError):
    """A key file can be read by others than its owner."""

    code = "key-file-permission"


class ProviderError(VmfsCryptError):
    """A key provider cannot give a key (missing, unreachable)."""

    code = "provider"
    exit_code = ExitCode.PROVIDER


class KeyRevokedError(ProviderError):
    """The provider took the key out of service (revoked, deactivated, destroyed): not an outage."""

    code = "key-revoked"


class KeyNotFoundError(KeyRevokedError):
    """The provider has no key with the requested id (destroyed there, or never existed)."""

    code = "key-not-found"


class KeyUnwrapError(VmfsCryptError):
    """A wrapped DEK does not open under its KEK: wrong key or tampered metadata."""

    code = "key-unwrap"
    exit_code = ExitCode.KEY_UNWRAP


class FormatError(VmfsCryptError):
    """On-disk metadata is malformed, of an unknown version, or uses unknown features."""

    code = "format"
    exit_code = ExitCode.FORMAT


class AgentError(VmfsCryptError):
    """The key agent cannot be reached or refused a request."""

    code = "agent"
    exit_code = ExitCode.AGENT


class UntrustedAgentError(AgentError):
    """The agent socket is served by a process of another user: never send it anything (issue 7, case 3)."""

    code = "agent-untrusted"


class MountError(VmfsCryptError):
    """A mount or unmount failed."""

    code = "mount"
    exit_code = ExitCode.MOUNT


class DataError(VmfsCryptError):
    """Encrypted data is damaged or incomplete (e.g. a truncated extent)."""

    code = "data"
    exit_code = ExitCode.DATA


class InUseError(VmfsCryptError):
    """A file or datastore is in use by another process (an open file, a running mount)."""

    code = "in-use"
    exit_code = ExitCode.IN_USE


class PermissionDeniedError(VmfsCryptError):
    """The caller lacks the privilege for a key operation (roles in the configuration)."""

    code = "permission"
    exit_code = ExitCode.PERMISSION


def _all_classes(cls: type) -> list[type]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_classes(sub))
    return out


ERROR_CLASSES: dict[str, type[VmfsCryptError]] = {c.code: c for c in _all_classes(VmfsCryptError)}


def error_for_code(code: str, message: str, default: type[VmfsCryptError] = VmfsCryptError) -> VmfsCryptError:
    """The exception of stable `code` with `message` (an unknown code gives `default`)."""
    return ERROR_CLASSES.get(code, default)(message)
