"""The TOML configuration: key providers, the default provider, the agent's socket."""

import hashlib
import os
import tomllib
from dataclasses import dataclass, field

import tomli_w

from .atomicio import write_atomic
from .errors import ConfigError, UsageError

CONFIG_ENV = "VMFS_CRYPT_CONFIG"
CONFIG_VERSION = 1


def default_config_path() -> str:
    if os.environ.get(CONFIG_ENV):
        return os.environ[CONFIG_ENV]
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "vmfs-crypt", "config.toml")


def runtime_dir() -> str:
    """A private directory for agent sockets ($XDG_RUNTIME_DIR, else /run for root, else /tmp)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base:
        base = "/run" if os.geteuid() == 0 and os.path.isdir("/run") else "/tmp"
        return os.path.join(base, f"vmfs-crypt-{os.geteuid()}")
    return os.path.join(base, "vmfs-crypt")


@dataclass
class Config:
    path: str
    default_provider: str | None = None
    providers: dict[str, dict] = field(default_factory=dict)
    agent: dict = field(default_factory=dict)

    @property
    def dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    @property
    def agent_socket(self) -> str:
        """The agent socket: configured, else one per config file in the private runtime dir."""
        if self.agent.get("socket"):
            return str(self.agent["socket"])
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

    def native_key_file(self, name: str, settings: dict | None = None) -> str:
        """A native provider's primary key file: as configured, else native-NAME.key beside the config."""
        return (settings or {}).get("key_file") or os.path.join(self.dir, f"native-{name}.key")

    def check_new_provider(self, name: str) -> None:
        if name in self.providers:
            raise UsageError(f"provider {name!r} already exists in {self.path}")

    def add_provider(self, name: str, settings: dict) -> None:
        """Record a provider (the first one becomes the default) and save the file."""
        self.check_new_provider(name)
        self.providers[name] = settings
        self.default_provider = self.default_provider or name
        self.save()

    def save(self) -> None:
        doc = {"version": CONFIG_VERSION, "providers": self.providers}
        if self.default_provider:
            doc["default_provider"] = self.default_provider
        if self.agent:
            doc["agent"] = self.agent
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
    version = doc.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError(f"{path}: config version {version!r} is not supported; upgrade vmfs-crypt")
    unknown = set(doc) - {"version", "default_provider", "providers", "agent"}
    if unknown:
        raise ConfigError(f"{path}: unknown settings {sorted(unknown)}")
    providers = doc.get("providers", {})
    if not isinstance(providers, dict) or not all(isinstance(v, dict) and "type" in v for v in providers.values()):
        raise ConfigError(f"{path}: each [providers.NAME] table needs a type")
    return Config(path=path, default_provider=doc.get("default_provider"), providers=providers,
                  agent=doc.get("agent", {}))
