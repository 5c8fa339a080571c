"""Disk and folder commands: create, encrypt, decrypt, rekey, info, cat."""

import json
import os

import click

from ..agent.launcher import agent_session
from ..crypto.sectors import SECTOR_SIZE
from ..errors import ERROR_CLASSES, UsageError
from ..ops import inspect, lifecycle
from .common import pass_ctx, progress, warn_backup


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        size = int(float(num) * units[unit])
    except ValueError:
        raise UsageError(f"size {text!r} is not a size such as 10G, 512M or 1073741824") from None
    if size <= 0 or size % SECTOR_SIZE:
        raise UsageError(f"size {text!r} must be a positive multiple of {SECTOR_SIZE} bytes")
    return size


@click.command()
@click.argument("disk", type=click.Path(dir_okay=False))
@click.option("--size", required=True, help="Virtual size, e.g. 10G, 512M (a multiple of 512 bytes).")
@click.option("--provider", help="Key provider (default: the configured default).")
@pass_ctx
def create(c, disk, size, provider):
    """Create a thin encrypted disk DISK.vmdk (descriptor plus flat extent)."""
    nbytes = parse_size(size)
    with agent_session(c.config, "create", target=os.path.abspath(disk)) as agent:
        result = lifecycle.create_disk(disk, nbytes, agent, provider)
    click.echo(f"created {result.descriptor} ({nbytes} bytes) with extent {result.extent}, "
               f"key {result.kek.key_id} of provider {result.kek.provider_id}")
    warn_backup(c.config)


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--provider", help="Key provider for a folder that is not yet encrypted.")
@pass_ctx
def encrypt(c, path, provider):
    """Encrypt an existing disk or VM folder (the whole folder: see README)."""
    with agent_session(c.config, "encrypt", target=os.path.abspath(path)) as agent:
        result = lifecycle.encrypt_folder(path, agent, provider, progress)
    done = result.files
    click.echo(f"{result.folder}: encrypted {len(done)} file(s){': ' + ', '.join(done) if done else ''}"
               + (f" ({result.note})" if result.note else ""))
    warn_backup(c.config)


@click.command()
@click.argument("path", type=click.Path(exists=True))
@pass_ctx
def decrypt(c, path):
    """Decrypt an encrypted disk's VM folder back to plaintext."""
    with agent_session(c.config, "decrypt", target=os.path.abspath(path)) as agent:
        result = lifecycle.decrypt_folder(path, agent, progress)
    click.echo(f"{result.folder}: decrypted {len(result.files)} file(s)")


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--deep", is_flag=True, help="New DEKs and re-encrypted data (default: only a new KEK).")
@click.option("--provider", help="Move the folder to this provider's new KEK (default: the same provider).")
@pass_ctx
def rekey(c, path, deep, provider):
    """Rekey a VM folder: shallow (new KEK, instant) or --deep (new DEKs, data rewritten)."""
    with agent_session(c.config, "rekey", target=os.path.abspath(path)) as agent:
        result = lifecycle.rekey_folder(path, agent, provider, deep, progress)
    old, new = result.old_kek, result.new_kek
    click.echo(f"{result.folder}: {'deep' if deep else 'shallow'} rekey of {len(result.files)} file(s): "
               f"key {old.key_id} of {old.provider_id} -> key {new.key_id} of {new.provider_id}")
    click.echo(f"the old key {old.key_id} is no longer used by this folder", err=True)


def _echo_folder(result: dict, indent: str = "") -> None:
    state = result["state"]
    click.echo(f"{indent}{result.get('path', result['folder'])}: "
               f"{'encrypted' if state == 'encrypted' else 'DAMAGED' if state == 'damaged' else 'not encrypted'}")
    if result["damage"]:
        click.echo(f"{indent}  {result['damage']}")
    if result["kek"]:
        click.echo(f"{indent}  folder key: {result['kek']['keyId']} (provider {result['kek']['provider']})")
        click.echo(f"{indent}  cipher: {result['cipher']}, sector size {result['sector_size']}")
    for f in result["files"]:
        where = f" key {f['kek']['keyId']} of {f['kek']['provider']} in {f['key_in']}" if f["kek"] else ""
        click.echo(f"{indent}  {f['name']:<32} {f['role']:<11} {f['size']:>14}{where}")


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(path, as_json):
    """Tell whether a file or folder is encrypted, under which key, and how each file is stored."""
    result = inspect.info(path)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        _echo_folder(result)
        if result["backing_path"] != result["path"]:
            click.echo(f"  (through the mount: at rest {result['backing_path']})")
        for sub in result.get("folders", []):
            _echo_folder(sub, "  ")
    damaged = [r for r in [result, *result.get("folders", [])] if r.get("damage_code")]
    if damaged:
        # The report is complete; the exit status says that something in it needs repair.
        first = damaged[0]
        more = f" (and {len(damaged) - 1} more damaged folder(s))" if len(damaged) > 1 else ""
        click.echo(f"vmfs-crypt: {first['folder']} is damaged{more}: {first['damage']}", err=True)
        raise click.exceptions.Exit(ERROR_CLASSES[first["damage_code"]].exit_code)


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))  # no exists=True: click would follow a symlink (issue 7, case 5)
@pass_ctx
def cat(c, file):
    """Write the plaintext of one file (e.g. a core dump) to standard output."""
    out = click.get_binary_stream("stdout")
    with agent_session(c.config, "cat", target=os.path.abspath(file)) as agent:
        lifecycle.cat_file(file, agent, out.write)
    out.flush()


COMMANDS = [create, encrypt, decrypt, rekey, info, cat]
