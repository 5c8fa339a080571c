"""Key provider commands: provider add native|kmip, list, backup, restore."""

import os
import sys

import click

from ..config import Config
from ..errors import UsageError
from ..providers.native import NativeKeyProvider
from .common import pass_ctx, warn_backup


@click.group()
def provider():
    """Manage key providers."""


@provider.group("add")
def provider_add():
    """Add a key provider."""


@provider_add.command("native")
@click.argument("name")
@click.option("--key-file", type=click.Path(dir_okay=False), help="Where to keep the primary key.")
@pass_ctx
def provider_add_native(c, name, key_file):
    """Add an embedded native key provider NAME (a local primary key)."""
    config = c.config
    config.check_new_provider(name)
    key_file = os.path.abspath(key_file or config.native_key_file(name))
    os.makedirs(config.dir, mode=0o700, exist_ok=True)
    NativeKeyProvider.generate(name, key_file)
    config.add_provider(name, {"type": "native", "key_file": key_file})
    click.echo(f"added native provider {name} (key file {key_file})"
               + (", the default" if config.default_provider == name else ""))
    click.echo(f"warning: back it up now: vmfs-crypt provider backup {name} FILE", err=True)


@provider_add.command("kmip")
@click.argument("name")
@click.option("--server", "servers", multiple=True, required=True, metavar="HOST:PORT",
              help="A KMIP server of the cluster; repeat for each, in the order to try them.")
@click.option("--cert", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Client certificate (PEM, extendedKeyUsage clientAuth).")
@click.option("--key", "key_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The client certificate's private key (PEM).")
@click.option("--ca", required=True, type=click.Path(exists=True, dir_okay=False),
              help="CA certificate(s) the servers' certificates must chain to (PEM).")
@click.option("--connect-timeout", type=float, default=5.0, show_default=True,
              help="Seconds for the TCP connection and the TLS handshake, per server.")
@click.option("--request-timeout", type=float, default=10.0, show_default=True,
              help="Seconds to wait for each answer, per server.")
@click.option("--on-revoke", type=click.Choice(["keep", "lock"]), default="keep", show_default=True,
              help="Open disks whose KEK gets revoked: keep serving until unmount, or lock them now.")
@click.option("--no-check", is_flag=True, help="Do not contact the servers now.")
@pass_ctx
def provider_add_kmip(c, name, servers, cert, key_path, ca, connect_timeout, request_timeout, on_revoke, no_check):
    """Add a standard key provider NAME: KEKs kept by a cluster of KMIP servers."""
    from ..providers.kmip import KmipKeyProvider, parse_server

    config = c.config
    config.check_new_provider(name)
    if connect_timeout <= 0 or request_timeout <= 0:
        raise UsageError("time-outs must be positive")
    parsed = [parse_server(s) for s in servers]
    settings = {"type": "kmip", "servers": list(servers), "cert": os.path.abspath(cert),
                "key": os.path.abspath(key_path), "ca": os.path.abspath(ca), "connect_timeout": connect_timeout,
                "request_timeout": request_timeout, "on_revoke": on_revoke}
    kmip = KmipKeyProvider(name, parsed, settings["cert"], settings["key"], settings["ca"],
                           connect_timeout, request_timeout, on_revoke)
    kmip.check()
    if not no_check:
        results = kmip.probe()
        for server, problem in results:
            click.echo(f"  {server}: {'ok' if problem is None else problem}", err=problem is not None)
        if all(problem is not None for _, problem in results):
            raise UsageError(f"no server of provider {name} works with these certificates; fix them, "
                             "or add it anyway with --no-check")
    config.add_provider(name, settings)
    click.echo(f"added KMIP provider {name} ({len(servers)} server(s): {', '.join(servers)})"
               + (", the default" if config.default_provider == name else ""))


@provider.command("list")
@pass_ctx
def provider_list(c):
    """List the configured key providers."""
    config = c.config
    if not config.providers:
        click.echo(f"no providers in {config.path}")
    for name, settings in sorted(config.providers.items()):
        mark = " (default)" if name == config.default_provider else ""
        click.echo(f"{name}\t{settings['type']}{mark}")
    warn_backup(config)


def _native(config: Config, name: str) -> NativeKeyProvider:
    name, settings = config.provider(name)
    if settings["type"] != "native":
        raise UsageError(f"provider {name} is a {settings['type']} provider; only native providers have a backup")
    return NativeKeyProvider(name, config.native_key_file(name, settings))


def _passphrase(confirm: bool) -> bytes:
    if sys.stdin.isatty():
        text = click.prompt("Backup passphrase", hide_input=True, confirmation_prompt=confirm)
    else:
        text = sys.stdin.readline().rstrip("\n")  # scripts pipe it in: never argv or environment
    if not text:
        raise UsageError("an empty passphrase is not allowed")
    return text.encode("utf-8")


@provider.command("backup")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
@pass_ctx
def provider_backup(c, name, file):
    """Back up native provider NAME's primary key to FILE, sealed with a passphrase (read from the terminal or stdin)."""
    if os.path.lexists(file):
        raise UsageError(f"{file} exists; choose a new file for the backup")
    _native(c.config, name).backup(file, _passphrase(confirm=True))
    click.echo(f"backed up provider {name} to {file}; keep the file and the passphrase apart")


@provider.command("restore")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@pass_ctx
def provider_restore(c, name, file):
    """Restore native provider NAME's primary key from a backup FILE."""
    config = c.config
    settings = config.providers.get(name, {"type": "native"})
    if settings.get("type") != "native":
        raise UsageError(f"provider {name} is not a native provider")
    key_file = os.path.abspath(config.native_key_file(name, settings))
    NativeKeyProvider.restore(name, key_file, file, _passphrase(confirm=False))
    if name not in config.providers:
        config.add_provider(name, {"type": "native", "key_file": key_file})
    click.echo(f"restored provider {name} into {key_file}")
