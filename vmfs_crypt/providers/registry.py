"""Build a key provider from its configuration table (the only place that knows every provider type)."""

from ..config import Config
from ..errors import ConfigError
from .base import KeyProvider
from .native import NativeKeyProvider


def build_provider(name: str, settings: dict, config: Config) -> KeyProvider:
    kind = settings.get("type")
    if kind == "native":
        return NativeKeyProvider(name, config.native_key_file(name, settings))
    if kind == "kmip":
        from .kmip import KmipKeyProvider  # PyKMIP loads only where a KMIP provider is configured
        return KmipKeyProvider.from_settings(name, settings, config)
    raise ConfigError(f"provider {name}: unknown type {kind!r} in {config.path} (known: native, kmip)")
