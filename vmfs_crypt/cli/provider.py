"""Key provider commands: provider add native|kmip, remove, list, backup, restore.

Every change is made by the agent (issue 11): the running one, else a private one that lives
as long as the command. The agent owns the configuration and the key files, checks the
manage-providers privilege and writes the audit record; the CLI reads and writes only the
user's own files (the backup file, the certificates it sends).
"""

import os
import sys

import click

from ..agent import protocol as p
from ..agent.launcher import agent_session
from ..errors import InUseError, UsageError
from ..format.atomicio import write_atomic
from ..fs.mounts import vmfs_mounts
from ..ops import inspect
from ..providers.native import NativeKeyProvider
from .common import Group, emit_json, note, pass_ctx, warn, warn_backup


@click.group(cls=Group)
def provider():
    """Manage key providers."""


@provider.group("add", cls=Group)
def provider_add():
    """Add a key provider."""


def _provider_session(c, action: str, target: str | None = None):
    """The agent that makes provider changes (the running one, else a private one), asked for manage-providers."""
    return agent_session(c.config, privilege="manage-providers", action=action, target=target)


@provider_add.command("native")
@click.argument("name")
@click.option("--key-file", type=click.Path(dir_okay=False), help="Where to keep the primary key.")
@pass_ctx
def provider_add_native(c, name, key_file):
    """Add an embedded native key provider NAME (a local primary key)."""
    settings = {"type": "native"}
    if key_file:
        settings["key_file"] = os.path.abspath(key_file)
    with _provider_session(c, f"add provider {name}") as agent:
        resp = agent.request(p.OP_PROVIDER_ADD, name=name, settings=settings)
    note(f"added native provider {name} (key file {resp['key_file']})" + (", the default" if resp["default"] else ""))
    warn(f"back it up now: vmfs-crypt provider backup {name} FILE")


def _read_pem(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(1 << 20)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--{what} {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None


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
    if connect_timeout <= 0 or request_timeout <= 0:
        raise UsageError("time-outs must be positive")
    settings = {"type": "kmip", "servers": list(servers), "cert": os.path.abspath(cert),
                "key": os.path.abspath(key_path), "ca": os.path.abspath(ca), "connect_timeout": connect_timeout,
                "request_timeout": request_timeout, "on_revoke": on_revoke}
    with _provider_session(c, f"add provider {name}") as agent:
        fields = {}
        if not agent.request(p.OP_WHOAMI)["owner"]:
            # An agent of another user (root) opens no path we name: it keeps copies of what we send.
            fields["pem"] = {"cert": _read_pem(cert, "cert"), "key": _read_pem(key_path, "key"), "ca": _read_pem(ca, "ca")}
        resp = agent.request(p.OP_PROVIDER_ADD, name=name, settings=settings, check=not no_check, **fields)
    for server, problem in resp["probe"]:
        if problem is None:
            note(f"  {server}: ok")
        else:
            warn(f"{server}: {problem}")
    note(f"added KMIP provider {name} ({len(servers)} server(s): {', '.join(servers)})"
               + (", the default" if resp["default"] else ""))


def _datastores_in_sight(config, given: tuple[str, ...]) -> list[str]:
    """The datastores to look in before removing a provider: --datastore, the mounted ones, the configured [mounts]."""
    found = [os.path.abspath(d) for d in given]
    found += [m.datastore for m in vmfs_mounts()]
    found += [m["datastore"] for m in config.mounts.values()]
    return [d for d in dict.fromkeys(found) if os.path.isdir(d)]


@provider.command("remove")
@click.argument("name")
@click.option("--datastore", "datastores", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Also look in this datastore for folders under NAME (repeatable; mounted and configured ones "
                   "are always searched).")
@click.option("--force", is_flag=True, help="Remove it even while folders use it (they cannot be opened until it is added back).")
@pass_ctx
def provider_remove(c, name, datastores, force):
    """Remove provider NAME from the configuration (a native key file stays where it is).

    Refused while a folder of a datastore in sight (mounted, configured in [mounts], or named
    with --datastore) is encrypted under NAME's keys; the refusal lists them.
    """
    searched = _datastores_in_sight(c.config, datastores)
    users, unreadable = inspect.folders_using(name, searched)
    if users and not force:
        shown = ", ".join(users[:10]) + (f" and {len(users) - 10} more" if len(users) > 10 else "")
        raise InUseError(f"provider {name} is in use by {len(users)} folder(s): {shown}; decrypt them or move them "
                         f"to another provider (vmfs-crypt rekey FOLDER --provider OTHER) first, or remove it "
                         "with --force (they cannot be opened until it is added back)")
    if unreadable:
        warn(f"{len(unreadable)} folder(s) could not be read to tell whether they use {name} "
             f"(e.g. {unreadable[0]}); the agent's user can check them")
    if not searched:
        warn("no datastore was searched for folders under this provider (none is mounted or configured); "
             "name one with --datastore")
    with _provider_session(c, f"remove provider {name}") as agent:
        resp = agent.request(p.OP_PROVIDER_REMOVE, name=name)
    note(f"removed provider {name}" + (f"; the default is now {resp['default_provider']}"
                                             if resp["default_provider"] else "; no provider is left"))
    if resp.get("key_file"):
        warn(f"its key file {resp['key_file']} was kept: disks under it need it")


def provider_list_json(config) -> dict:
    """`provider list --json` (README, "Output for scripts"): from the configuration file, no agent needed."""
    out = []
    for name, settings in sorted(config.providers.items()):
        entry = {"name": name, "type": settings["type"], "default": name == config.default_provider}
        if settings["type"] == "native":
            key_file = config.native_key_file(name, settings)
            entry.update(key_file=key_file, backed_up=NativeKeyProvider(name, key_file).describe()["backed_up"])
        else:
            entry.update(servers=list(settings["servers"]), on_revoke=settings.get("on_revoke", "keep"),
                         cert=settings["cert"], ca=settings["ca"])
        out.append(entry)
    return {"config": config.path, "default_provider": config.default_provider, "providers": out}


@provider.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (README, \"Output for scripts\").")
@pass_ctx
def provider_list(c, as_json):
    """List the configured key providers."""
    config = c.config
    if as_json:
        emit_json(provider_list_json(config))
        return
    if not config.providers:
        click.echo(f"no providers in {config.path}")
    for name, settings in sorted(config.providers.items()):
        mark = " (default)" if name == config.default_provider else ""
        click.echo(f"{name}\t{settings['type']}{mark}")
    warn_backup(config)


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
    file = os.path.abspath(file)
    if os.path.lexists(file):
        raise UsageError(f"{file} exists; choose a new file for the backup")
    with _provider_session(c, f"back up provider {name}", file) as agent:
        resp = agent.request(p.OP_PROVIDER_BACKUP, name=name, target=file,
                             passphrase=_passphrase(confirm=True).decode("utf-8"))
    # Written by us, as us: the agent (perhaps root) writes no path a client names.
    write_atomic(file, resp["backup"].encode("utf-8"), 0o600)
    note(f"backed up provider {name} to {file}; keep the file and the passphrase apart")


@provider.command("restore")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@pass_ctx
def provider_restore(c, name, file):
    """Restore native provider NAME's primary key from a backup FILE."""
    file = os.path.abspath(file)
    with _provider_session(c, f"restore provider {name}", file) as agent:
        document = NativeKeyProvider.read_backup(file)
        resp = agent.request(p.OP_PROVIDER_RESTORE, name=name, source=file,
                             backup=document.decode("utf-8", "replace"),
                             passphrase=_passphrase(confirm=False).decode("utf-8"))
    note(f"restored provider {name} into {resp['key_file']}")
