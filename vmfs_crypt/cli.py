"""The vmfs-crypt command line (click): user errors end in one line and a numbered exit code."""

import contextlib
import json
import os
import sys

import click

from . import __version__, disks, mounting
from .agent import AgentClient, start_agent
from .config import Config, load_config
from .errors import AgentError, UsageError, VmfsCryptError
from .hardening import disable_core_dumps
from .providers.native import NativeKeyProvider


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


@contextlib.contextmanager
def agent_session(config: Config):
    """A client of the running agent, or of a sidecar started for this command only."""
    client = AgentClient(config.agent_socket)
    if client.alive():
        yield client
        client.close()
        return
    start_agent(config)
    try:
        yield client
    finally:
        client.stop()


def _progress_factory(total: int, label: str):
    return click.progressbar(length=max(total, 1), label=label, file=sys.stderr)


def _warn_backup(config: Config) -> None:
    for name, settings in config.providers.items():
        if settings.get("type") == "native":
            provider = NativeKeyProvider(name, config.native_key_file(name, settings))
            for w in provider.warnings():
                click.echo(f"warning: {w}", err=True)


@click.group()
@click.version_option(__version__, prog_name="vmfs-crypt")
@click.option("--config", "config_path", envvar="VMFS_CRYPT_CONFIG", type=click.Path(dir_okay=False),
              help="Configuration file (default: ~/.config/vmfs-crypt/config.toml, or $VMFS_CRYPT_CONFIG).")
@click.pass_context
def cli(ctx, config_path):
    """Encrypt VM disks at rest, vSphere style, and show them in plaintext through a FUSE mount."""
    disable_core_dumps()  # commands such as encrypt and cat hold DEKs in this process
    ctx.obj = Ctx(config_path)


# -- disks ---------------------------------------------------------------------------------
@cli.command()
@click.argument("disk", type=click.Path(dir_okay=False))
@click.option("--size", required=True, help="Virtual size, e.g. 10G, 512M (a multiple of 512 bytes).")
@click.option("--provider", help="Key provider (default: the configured default).")
@pass_ctx
def create(c, disk, size, provider):
    """Create a thin encrypted disk DISK.vmdk (descriptor plus flat extent)."""
    nbytes = disks.parse_size(size)
    with agent_session(c.config) as agent:
        result = disks.create_disk(disk, nbytes, agent, provider)
    click.echo(f"created {result['descriptor']} ({nbytes} bytes) with extent {result['extent']}, "
               f"key {result['key_id']} of provider {result['provider']}")
    _warn_backup(c.config)


@cli.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--provider", help="Key provider for a folder that is not yet encrypted.")
@pass_ctx
def encrypt(c, path, provider):
    """Encrypt an existing disk or VM folder (the whole folder: see README)."""
    with agent_session(c.config) as agent:
        result = disks.encrypt_folder(path, agent, provider, _progress_factory)
    done = result["encrypted"]
    click.echo(f"{result['folder']}: encrypted {len(done)} file(s){': ' + ', '.join(done) if done else ''}"
               + (f" ({result['note']})" if result.get("note") else ""))
    _warn_backup(c.config)


@cli.command()
@click.argument("path", type=click.Path(exists=True))
@pass_ctx
def decrypt(c, path):
    """Decrypt an encrypted disk's VM folder back to plaintext."""
    with agent_session(c.config) as agent:
        result = disks.decrypt_folder(path, agent, _progress_factory)
    click.echo(f"{result['folder']}: decrypted {len(result['decrypted'])} file(s)")


@cli.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--deep", is_flag=True, help="New DEKs and re-encrypted data (default: only a new KEK).")
@click.option("--provider", help="Move the folder to this provider's new KEK (default: the same provider).")
@pass_ctx
def rekey(c, path, deep, provider):
    """Rekey a VM folder: shallow (new KEK, instant) or --deep (new DEKs, data rewritten)."""
    with agent_session(c.config) as agent:
        result = disks.rekey_folder(path, agent, provider, deep, _progress_factory)
    old, new = result["old_kek"], result["new_kek"]
    click.echo(f"{result['folder']}: {'deep' if deep else 'shallow'} rekey of {len(result['files'])} file(s): "
               f"key {old['key_id']} of {old['provider_id']} -> key {new['key_id']} of {new['provider_id']}")
    click.echo(f"the old key {old['key_id']} is no longer used by this folder", err=True)


@cli.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(path, as_json):
    """Tell whether a file or folder is encrypted, under which key, and how each file is stored."""
    result = disks.info(path)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['path']}: {'encrypted' if result['encrypted'] else 'not encrypted'}")
    if result["encrypted"]:
        kek = result["folder_kek"]
        click.echo(f"  folder key: {kek['key_id']} (provider {kek['provider']})")
        click.echo(f"  cipher: {result['cipher']}, sector size {result['sector_size']}")
    for f in result["files"]:
        where = f" key {f['key_id']} of {f['provider']} in {f['key_in']}" if f["key_id"] else ""
        click.echo(f"  {f['name']:<32} {f['role']:<11} {f['size']:>14}{where}")


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@pass_ctx
def cat(c, file):
    """Write the plaintext of one file (e.g. a core dump) to standard output."""
    out = click.get_binary_stream("stdout")
    with agent_session(c.config) as agent:
        disks.cat_file(file, agent, out.write)
    out.flush()


# -- providers -------------------------------------------------------------------------------
@cli.group()
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
    _warn_backup(config)


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
    if os.path.exists(file):
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


# -- agent -----------------------------------------------------------------------------------
@cli.group()
def agent():
    """Run the key agent by hand (mount starts a sidecar when none runs)."""


@agent.command("start")
@pass_ctx
def agent_start(c):
    """Start a key agent for this configuration."""
    if AgentClient(c.config.agent_socket).alive():
        raise AgentError(f"an agent already runs on {c.config.agent_socket}")
    pid = start_agent(c.config)
    click.echo(f"agent {pid} listening on {c.config.agent_socket}")


@agent.command("stop")
@pass_ctx
def agent_stop(c):
    """Stop the key agent (open disks keep their keys; new opens need an agent)."""
    client = AgentClient(c.config.agent_socket)
    if not client.alive():
        raise AgentError(f"no agent runs on {c.config.agent_socket}")
    client.stop()
    click.echo("agent stopped")


@agent.command("status")
@pass_ctx
def agent_status(c):
    """Show the agent's providers and cache."""
    client = AgentClient(c.config.agent_socket)
    status = client.request("status")
    click.echo(f"agent {status['pid']} on {c.config.agent_socket}: {status['cached_keks']} key(s) cached")
    for p in status["providers"]:
        click.echo(f"  provider {p['name']} ({p['type']})")
    for w in status["warnings"]:
        click.echo(f"warning: {w}", err=True)


# -- mounting --------------------------------------------------------------------------------
@cli.command()
@click.argument("datastore", type=click.Path(file_okay=False))
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground (logs to stderr).")
@click.option("-o", "options", help="FUSE options, comma-separated (e.g. max_read=131072).")
@click.option("--allow-other", is_flag=True, help="Let other users use the mount (needs user_allow_other).")
@click.option("--agent", "agent_socket", type=click.Path(), help="Socket of a running key agent to use.")
@click.option("--ready-fd", type=int, hidden=True)
@click.option("--stop-agent-on-exit", is_flag=True, hidden=True)
@pass_ctx
def mount(c, datastore, mountpoint, foreground, options, allow_other, agent_socket, ready_fd, stop_agent_on_exit):
    """Mount DATASTORE at MOUNTPOINT in plaintext."""
    if foreground:
        import logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s mount[%(process)d] %(levelname)s %(message)s")
        mounting.run_foreground(c.config, datastore, mountpoint, agent_socket, options, allow_other, ready_fd,
                                stop_agent_on_exit)
        return
    log_path = mounting.mount_background(c.config, datastore, mountpoint, agent_socket, options, allow_other)
    click.echo(f"mounted {datastore} at {mountpoint} (log: {log_path})")
    _warn_backup(c.config)


@cli.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
def umount(mountpoint):
    """Unmount a vmfs-crypt mount."""
    mounting.umount(mountpoint)
    click.echo(f"unmounted {mountpoint}")


def main(argv=None) -> int:
    try:
        cli.main(args=argv, prog_name="vmfs-crypt", standalone_mode=False)
        return 0
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except VmfsCryptError as exc:
        click.echo(f"vmfs-crypt: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except OSError as exc:
        click.echo(f"vmfs-crypt: {exc.filename or ''}: {exc.strerror}" if exc.filename else f"vmfs-crypt: {exc}", err=True)
        return 10


__import__("vmfs_crypt.cli_kmip", fromlist=["register"]).register(cli)  # provider add kmip, status, unlock


if __name__ == "__main__":
    sys.exit(main())
