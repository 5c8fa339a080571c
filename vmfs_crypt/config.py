"""The TOML configuration: key providers, the default provider, the agent, roles, audit, configured mounts; validated when loaded, written by one `save`."""

import hashlib
import math
import os
import stat
import tomllib
from dataclasses import dataclass, field

import tomli_w

from .errors import ConfigError, UsageError
from .format.atomicio import write_atomic
from .runtime import runtime_dir

CONFIG_ENV = "VMFS_CRYPT_CONFIG"
CONFIG_VERSION = 1
DEFAULT_RETRY_INTERVAL_S = 30.0

# Every setting of every table, with its type: anything else is refused at load, so that a
# typo never turns into a thread dying at run time (issue 8: a bad retry_interval did).
_STR, _NUMBER, _NONNEG, _STR_LIST = "a string", "a positive number", "a number >= 0", "a list of strings"
_BOOL, _NAMES, _POS_INT, _ABS_PATH = "true or false", "a list of names", "a positive integer", "an absolute path"
PROVIDER_SCHEMAS: dict[str, dict[str, str]] = {
    "native": {"type": _STR, "key_file": _STR},
    "kmip": {"type": _STR, "servers": _STR_LIST, "cert": _STR, "key": _STR, "ca": _STR,
             "connect_timeout": _NUMBER, "request_timeout": _NUMBER, "holdoff": _NONNEG, "on_revoke": _STR},
}
AGENT_SCHEMA = {"socket": _STR, "retry_interval": _NUMBER}
ON_REVOKE_CHOICES = ("keep", "lock")

# Issue 11: who may do which crypto operation, named like vSphere's Cryptographer.* privileges.
# The agent enforces them (agent/authz.py) from the peer's kernel credentials.
PRIVILEGES: dict[str, str] = {
    "mount": "get keys for serving VMs (run a mount: unwraps at open, keys of new files, prefetch)",
    "cat": "read a file's plaintext offline (vmfs-crypt cat)",
    "encrypt": "create encrypted disks and encrypt folders (new KEKs, new file keys)",
    "decrypt": "decrypt folders",
    "rekey": "rekey folders, shallow or deep",
    "manage-providers": "add, remove, back up and restore key providers",
    "unlock": "fetch locked keys again now",
    "policy": "change the encryption policy (the default provider, on_revoke)",
    "operate-mounts": "start and stop the mounts configured in [mounts] (no keys)",
}
# Built-in roles: "vm-operator" is vSphere's No Cryptography Administrator (it may start and
# stop configured mounts and use them through their file permissions, and nothing with keys).
BUILTIN_ROLES: dict[str, frozenset[str]] = {
    "administrator": frozenset(PRIVILEGES),
    "vm-operator": frozenset({"operate-mounts"}),
}
ROLE_SCHEMA = {"users": _NAMES, "groups": _NAMES, "privileges": _NAMES}
AUDIT_SCHEMA = {"path": _STR, "max_bytes": _POS_INT, "keep": _POS_INT, "syslog": _STR}
MOUNT_SCHEMA = {"datastore": _ABS_PATH, "mountpoint": _ABS_PATH, "allow_other": _BOOL, "options": _STR}
DEFAULT_AUDIT_MAX_BYTES = 10 << 20
DEFAULT_AUDIT_KEEP = 5
DEFAULT_SYSLOG = "/dev/log"
SYSLOG_OFF = "off"


def default_config_path() -> str:
    if os.environ.get(CONFIG_ENV):
        return os.environ[CONFIG_ENV]
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "vmfs-crypt", "config.toml")


def _check_value(value, kind: str) -> bool:
    if kind == _STR:
        return isinstance(value, str) and bool(value)
    if kind == _NUMBER:
        return type(value) in (int, float) and math.isfinite(value) and value > 0
    if kind == _NONNEG:
        return type(value) in (int, float) and math.isfinite(value) and value >= 0
    if kind == _STR_LIST:
        return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)
    if kind == _NAMES:  # may be empty (a role nobody holds yet)
        return isinstance(value, list) and all(isinstance(v, str) and v and v == v.strip() for v in value)
    if kind == _BOOL:
        return type(value) is bool
    if kind == _POS_INT:
        return type(value) is int and value > 0
    if kind == _ABS_PATH:
        return isinstance(value, str) and os.path.isabs(value)
    raise AssertionError(kind)


def _check_table(table, schema: dict[str, str], where: str, path: str) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {where} must be a table")
    for key, value in table.items():
        if key not in schema:
            raise ConfigError(f"{path}: unknown setting {key!r} in {where} (known: {', '.join(sorted(schema))})")
        if not _check_value(value, schema[key]):
            raise ConfigError(f"{path}: {where}.{key} must be {schema[key]}, not {value!r}")
    return dict(table)


def check_provider_settings(name: str, settings, path: str) -> dict:
    where = f"[providers.{name}]"
    if not isinstance(settings, dict) or settings.get("type") not in PROVIDER_SCHEMAS:
        kind = settings.get("type") if isinstance(settings, dict) else None
        raise ConfigError(f"{path}: {where} needs type = one of {', '.join(PROVIDER_SCHEMAS)} (not {kind!r})")
    settings = _check_table(settings, PROVIDER_SCHEMAS[settings["type"]], where, path)
    if settings["type"] == "kmip":
        for required in ("servers", "cert", "key", "ca"):
            if required not in settings:
                raise ConfigError(f"{path}: {where} lacks {required}")
        if settings.get("on_revoke", "keep") not in ON_REVOKE_CHOICES:
            raise ConfigError(f"{path}: {where}.on_revoke must be one of {', '.join(ON_REVOKE_CHOICES)}")
    return settings


def check_role(name: str, table, path: str) -> dict:
    where = f"[roles.{name}]"
    role = _check_table(table, ROLE_SCHEMA, where, path)
    if name in BUILTIN_ROLES:
        if "privileges" in role:
            raise ConfigError(f"{path}: {where} is a built-in role with fixed privileges "
                              f"({', '.join(sorted(BUILTIN_ROLES[name]))}); list only users and groups, "
                              "or define a role of another name")
    elif "privileges" not in role:
        raise ConfigError(f"{path}: {where} needs privileges = [...] (known: {', '.join(PRIVILEGES)})")
    for priv in role.get("privileges", []):
        if priv not in PRIVILEGES:
            raise ConfigError(f"{path}: {where}: unknown privilege {priv!r} (known: {', '.join(PRIVILEGES)})")
    return role


def check_mount(name: str, table, path: str) -> dict:
    where = f"[mounts.{name}]"
    mount = _check_table(table, MOUNT_SCHEMA, where, path)
    for required in ("datastore", "mountpoint"):
        if required not in mount:
            raise ConfigError(f"{path}: {where} lacks {required}")
    return mount


def _tables(doc: dict, key: str, check, path: str) -> dict[str, dict]:
    tables = doc.get(key, {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: {key} must be a table of [{key}.NAME] tables")
    return {name: check(name, table, path) for name, table in tables.items()}


def check_config_trust(path: str) -> None:
    """The agent obeys its configuration (roles, providers): nobody but its own user or root may change it.

    Refuses a file, or a directory holding it, that another user owns or that group or others
    may write (a sticky directory such as /tmp is fine for the directory).
    """
    me = os.geteuid()
    for target, is_dir in ((path, False), (os.path.dirname(os.path.abspath(path)), True)):
        try:
            st = os.stat(target)
        except FileNotFoundError:
            continue
        if st.st_uid not in (me, 0):
            raise ConfigError(f"{target} belongs to uid {st.st_uid}: the agent's configuration must belong to "
                              f"its own user (uid {me}) or root, or that user could grant itself privileges")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (is_dir and st.st_mode & stat.S_ISVTX):
            raise ConfigError(f"{target} can be written by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                              f"run 'chmod go-w {target}': whoever can change it can change the agent's roles")


@dataclass
class AuditSettings:
    path: str | None = None
    max_bytes: int = DEFAULT_AUDIT_MAX_BYTES
    keep: int = DEFAULT_AUDIT_KEEP
    syslog: str = DEFAULT_SYSLOG

    def to_toml(self) -> dict:
        out: dict = {}
        if self.path:
            out["path"] = self.path
        if self.max_bytes != DEFAULT_AUDIT_MAX_BYTES:
            out["max_bytes"] = self.max_bytes
        if self.keep != DEFAULT_AUDIT_KEEP:
            out["keep"] = self.keep
        if self.syslog != DEFAULT_SYSLOG:
            out["syslog"] = self.syslog
        return out


@dataclass
class AgentSettings:
    socket: str | None = None
    retry_interval: float = DEFAULT_RETRY_INTERVAL_S

    def to_toml(self) -> dict:
        out: dict = {}
        if self.socket:
            out["socket"] = self.socket
        if self.retry_interval != DEFAULT_RETRY_INTERVAL_S:
            out["retry_interval"] = self.retry_interval
        return out


@dataclass
class Config:
    path: str
    default_provider: str | None = None
    providers: dict[str, dict] = field(default_factory=dict)
    agent: AgentSettings = field(default_factory=AgentSettings)
    roles: dict[str, dict] = field(default_factory=dict)  # [roles.NAME]: users, groups, privileges
    audit: AuditSettings = field(default_factory=AuditSettings)
    mounts: dict[str, dict] = field(default_factory=dict)  # [mounts.NAME]: datastore, mountpoint, ...

    @property
    def dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    @property
    def agent_socket(self) -> str:
        """The agent socket: configured, else one per config file in the private runtime dir."""
        if self.agent.socket:
            return self.agent.socket
        tag = hashlib.sha256(os.path.abspath(self.path).encode()).hexdigest()[:12]
        return os.path.join(runtime_dir(), f"agent-{tag}.sock")

    @property
    def audit_path(self) -> str:
        """The agent's audit log: [audit] path, else audit.log beside the configuration (a private directory)."""
        return self.resolve_path(self.audit.path) if self.audit.path else os.path.join(self.dir, "audit.log")

    def role_privileges(self, name: str) -> frozenset[str]:
        return BUILTIN_ROLES.get(name) or frozenset(self.roles[name].get("privileges", ()))

    def provider(self, name: str | None) -> tuple[str, dict]:
        name = name or self.default_provider
        if not name:
            raise ConfigError(f"no key provider is configured in {self.path}; "
                              "add one with 'vmfs-crypt provider add native NAME'")
        if name not in self.providers:
            raise ConfigError(f"provider {name!r} is not in {self.path}; known: {', '.join(sorted(self.providers)) or 'none'}")
        return name, self.providers[name]

    def resolve_path(self, value: str) -> str:
        """A path setting: absolute, or relative to the configuration file's directory."""
        return value if os.path.isabs(value) else os.path.join(self.dir, value)

    def native_key_file(self, name: str, settings: dict | None = None) -> str:
        """A native provider's primary key file: as configured, else native-NAME.key beside the config."""
        configured = (settings or {}).get("key_file")
        return self.resolve_path(configured) if configured else os.path.join(self.dir, f"native-{name}.key")

    def check_new_provider(self, name: str) -> None:
        if name in self.providers:
            raise UsageError(f"provider {name!r} already exists in {self.path}")

    def add_provider(self, name: str, settings: dict) -> None:
        """Record a provider (the first one becomes the default) and save the file."""
        self.check_new_provider(name)
        self.providers[name] = check_provider_settings(name, settings, self.path)
        self.default_provider = self.default_provider or name
        self.save()

    def remove_provider(self, name: str) -> None:
        self.provider(name)
        del self.providers[name]
        if self.default_provider == name:
            self.default_provider = sorted(self.providers)[0] if self.providers else None
        self.save()

    def save(self) -> None:
        doc: dict = {"version": CONFIG_VERSION, "providers": self.providers}
        if self.default_provider:
            doc["default_provider"] = self.default_provider
        agent = self.agent.to_toml()
        if agent:
            doc["agent"] = agent
        if self.roles:
            doc["roles"] = self.roles
        audit = self.audit.to_toml()
        if audit:
            doc["audit"] = audit
        if self.mounts:
            doc["mounts"] = self.mounts
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        write_atomic(self.path, tomli_w.dumps(doc).encode("utf-8"), 0o600)


def load_config(path: str | None = None) -> Config:
    path = path or default_config_path()
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        return Config(path=path)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML (nested too deeply)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration ({exc.strerror})") from None
    version = doc.get("version", CONFIG_VERSION)
    if type(version) is not int or version != CONFIG_VERSION:
        raise ConfigError(f"{path}: config version {version!r} is not supported; upgrade vmfs-crypt")
    unknown = set(doc) - {"version", "default_provider", "providers", "agent", "roles", "audit", "mounts"}
    if unknown:
        raise ConfigError(f"{path}: unknown settings {sorted(unknown)}")
    providers = doc.get("providers", {})
    if not isinstance(providers, dict):
        raise ConfigError(f"{path}: providers must be a table of [providers.NAME] tables")
    providers = {name: check_provider_settings(name, s, path) for name, s in providers.items()}
    default = doc.get("default_provider")
    if default is not None and (not isinstance(default, str) or default not in providers):
        raise ConfigError(f"{path}: default_provider {default!r} is not one of the configured providers")
    agent = _check_table(doc.get("agent", {}), AGENT_SCHEMA, "[agent]", path)
    audit = _check_table(doc.get("audit", {}), AUDIT_SCHEMA, "[audit]", path)
    return Config(path=path, default_provider=default, providers=providers,
                  agent=AgentSettings(socket=agent.get("socket"),
                                      retry_interval=float(agent.get("retry_interval", DEFAULT_RETRY_INTERVAL_S))),
                  roles=_tables(doc, "roles", check_role, path),
                  audit=AuditSettings(path=audit.get("path"), max_bytes=audit.get("max_bytes", DEFAULT_AUDIT_MAX_BYTES),
                                      keep=audit.get("keep", DEFAULT_AUDIT_KEEP),
                                      syslog=audit.get("syslog", DEFAULT_SYSLOG)),
                  mounts=_tables(doc, "mounts", check_mount, path))
