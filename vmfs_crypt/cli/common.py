"""What every CLI module shares: the context with the lazily loaded configuration, progress, warnings."""

import sys

import click

from ..agent.client import AgentClient
from ..agent.launcher import agent_socket
from ..config import Config, load_config
from ..errors import AgentError
from ..providers.native import NativeKeyProvider


class Ctx:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config


pass_ctx = click.make_pass_decorator(Ctx)


def running_agent(config: Config) -> AgentClient:
    """The configuration's running agent, or a clear error saying how to get one."""
    client = AgentClient(agent_socket(config))
    if not client.alive():
        raise AgentError(f"no key agent runs for {config.path} (socket {config.agent_socket}); "
                         "it runs while a datastore is mounted, or after 'vmfs-crypt agent start'")
    return client


def progress(total: int, label: str):
    return click.progressbar(length=max(total, 1), label=label, file=sys.stderr)


def warn_backup(config: Config) -> None:
    for name, settings in config.providers.items():
        if settings.get("type") == "native":
            provider = NativeKeyProvider(name, config.native_key_file(name, settings))
            for w in provider.warnings():
                click.echo(f"warning: {w}", err=True)
