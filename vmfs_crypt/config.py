"""The TOML configuration: key providers, the default provider, the agent; validated when loaded, written by one `save`."""

import hashlib
import math
import os
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
PROVIDER_SCHEMAS: dict[str, dict[str, str]] = {
    "native": {"type": _STR, "key_file": _STR},
    "kmip": {"type": _STR, "servers": _STR_LIST, "cert": _STR, "key": _STR, "ca": _STR,
             "connect_timeout": _NUMBER, "request_timeout": _NUMBER, "holdoff": _NONNEG, "on_revoke": _STR},
}
AGENT_SCHEMA = {"socket": _STR, "retry_interval": _NUMBER}
ON_REVOKE_CHOICES = ("keep", "lock")


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
    unknown = set(doc) - {"version", "default_provider", "providers", "agent"}
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
    return Config(path=path, default_provider=default, providers=providers,
                  agent=AgentSettings(socket=agent.get("socket"),
                                      retry_interval=float(agent.get("retry_interval", DEFAULT_RETRY_INTERVAL_S))))
