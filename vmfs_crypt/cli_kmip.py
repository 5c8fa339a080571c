"""CLI commands of the standard (KMIP) key provider and of locked disks: provider add kmip, status, unlock."""

import os
import time

import click

from .agent import AgentClient
from .errors import AgentError, UsageError


def _agent(config) -> AgentClient:
    client = AgentClient(config.agent_socket)
    if not client.alive():
        raise AgentError(f"no key agent runs for {config.path} (socket {config.agent_socket}); "
                         "it runs while a datastore is mounted, or after 'vmfs-crypt agent start'")
    return client


@click.command("kmip")
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
@click.pass_obj
def provider_add_kmip(c, name, servers, cert, key_path, ca, connect_timeout, request_timeout, on_revoke, no_check):
    """Add a standard key provider NAME: KEKs kept by a cluster of KMIP servers."""
    from .providers.kmip import KmipKeyProvider, parse_server

    config = c.config
    config.check_new_provider(name)
    if connect_timeout <= 0 or request_timeout <= 0:
        raise UsageError("time-outs must be positive")
    parsed = [parse_server(s) for s in servers]
    settings = {"type": "kmip", "servers": list(servers), "cert": os.path.abspath(cert),
                "key": os.path.abspath(key_path), "ca": os.path.abspath(ca), "connect_timeout": connect_timeout,
                "request_timeout": request_timeout, "on_revoke": on_revoke}
    provider = KmipKeyProvider(name, parsed, settings["cert"], settings["key"], settings["ca"],
                               connect_timeout, request_timeout, on_revoke)
    provider.check()
    if not no_check:
        results = provider.probe()
        for server, problem in results:
            click.echo(f"  {server}: {'ok' if problem is None else problem}", err=problem is not None)
        if all(problem is not None for _, problem in results):
            raise UsageError(f"no server of provider {name} works with these certificates; fix them, "
                             "or add it anyway with --no-check")
    config.add_provider(name, settings)
    click.echo(f"added KMIP provider {name} ({len(servers)} server(s): {', '.join(servers)})"
               + (", the default" if config.default_provider == name else ""))


@click.command("status")
@click.pass_obj
def status(c):
    """Show the agent, its providers and the locked disks (KEKs it could not fetch)."""
    client = _agent(c.config)
    st = client.request("status")
    locked = client.request("locked")["locked"]
    click.echo(f"agent {st['pid']} on {c.config.agent_socket}: {st['cached_keks']} key(s) cached, "
               f"{len(locked)} locked")
    for p in st["providers"]:
        extra = f" servers {', '.join(p['servers'])}, on_revoke={p['on_revoke']}" if p.get("servers") else ""
        click.echo(f"  provider {p['name']} ({p['type']}){extra}")
    for entry in locked:
        disks = ", ".join(entry["disks"]) or "(no disk opened yet)"
        when = time.strftime("%H:%M:%S", time.localtime(entry["last_try"]))
        click.echo(f"LOCKED key {entry['keyId']} of provider {entry['provider']}: {disks}")
        click.echo(f"  last try {when}: {entry['error']}")
    for w in st["warnings"]:
        click.echo(f"warning: {w}", err=True)


@click.command("unlock")
@click.pass_obj
def unlock(c):
    """Fetch the KEKs of locked disks again now (after a KMS outage); no remount needed."""
    client = _agent(c.config)
    resp = client.request("unlock")
    for ref in resp["unlocked"]:
        click.echo(f"unlocked key {ref['keyId']} of provider {ref['provider']}")
    for entry in resp["locked"]:
        click.echo(f"still locked: key {entry['keyId']} of provider {entry['provider']} "
                   f"({', '.join(entry['disks']) or 'no disk yet'}): {entry['error']}", err=True)
    if resp["locked"]:
        raise AgentError(f"{len(resp['locked'])} key(s) are still locked")
    if not resp["unlocked"]:
        click.echo("nothing was locked")


def register(cli: click.Group) -> None:
    """Attach these commands to the main CLI (called at the end of cli.py)."""
    cli.commands["provider"].commands["add"].add_command(provider_add_kmip)
    cli.add_command(status)
    cli.add_command(unlock)
