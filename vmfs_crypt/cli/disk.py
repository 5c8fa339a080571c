"""Disk and folder commands: create, encrypt, decrypt, rekey, info, cat."""

import os

import click

from ..agent.launcher import agent_session
from ..crypto.sectors import SECTOR_SIZE
from ..errors import ERROR_CLASSES, UsageError
from ..fs.mounts import backing_path
from ..ops import inspect, lifecycle
from .common import emit_json, note, offline_heap, pass_ctx, progress, verbose, warn_backup
from .online import online_target, parse_rate, run_online

BACKGROUND = click.option("--background", is_flag=True,
                          help="With the datastore mounted: start the operation in the mount and return at once.")
RATE = click.option("--rate", help="With the datastore mounted: at most this many bytes per second, e.g. 200M.")


def _online(c, path: str, purpose: str, op: str, provider, background: bool, rate) -> dict | None:
    """Hand the operation to the mount of PATH's datastore (issue 10); None when it is not mounted by us."""
    target = online_target(path)
    if target is None:
        if background or rate:
            raise UsageError(f"{path}: --background and --rate need the datastore mounted (the mount runs it online)")
        return None
    with agent_session(c.config, purpose, target=os.path.abspath(path)):  # the privilege check and its audit record
        return run_online(target, op, provider, background, parse_rate(rate))


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
    note(f"created {result.descriptor} ({nbytes} bytes) with extent {result.extent}, "
               f"key {result.kek.key_id} of provider {result.kek.provider_id}")
    warn_backup(c.config)


@click.command()
@click.argument("path", type=click.Path())
@click.option("--provider", help="Key provider for a folder that is not yet encrypted.")
@BACKGROUND
@RATE
@pass_ctx
def encrypt(c, path, provider, background, rate):
    """Encrypt a disk's VM folder or a folder (the whole folder: see README); a new PATH becomes an empty encrypted folder.

    An empty folder, or a PATH that does not exist yet (its parent must), becomes an encrypted
    VM folder: everything later written to it is encrypted from the first byte.
    """
    if not os.path.lexists(path):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent) or path.lower().endswith(".vmdk"):
            raise UsageError(f"{path}: no such disk or folder (a new folder needs an existing parent folder)")
        os.mkdir(backing_path(os.path.abspath(path)), 0o755)
        note(f"made the folder {os.path.abspath(path)}")
    elif (st := _online(c, path, "encrypt", "encrypt", provider, background, rate)) is not None:
        if not background:
            note(f"{st['folder']}: encrypted online ({st['done_bytes']} bytes rewritten in place)")
            warn_backup(c.config)
        return
    offline_heap()
    with agent_session(c.config, "encrypt", target=os.path.abspath(path)) as agent:
        result = lifecycle.encrypt_folder(path, agent, provider, progress)
    done = result.files
    note(f"{result.folder}: encrypted {len(done)} file(s){': ' + ', '.join(done) if done else ''}"
               + (f" ({result.note})" if result.note else ""))
    warn_backup(c.config)


@click.command()
@click.argument("path", type=click.Path(exists=True))
@BACKGROUND
@RATE
@pass_ctx
def decrypt(c, path, background, rate):
    """Decrypt an encrypted disk's VM folder back to plaintext (online, by the mount, when it is mounted)."""
    if (st := _online(c, path, "decrypt", "decrypt", None, background, rate)) is not None:
        if not background:
            note(f"{st['folder']}: decrypted online ({st['done_bytes']} bytes rewritten in place)")
        return
    offline_heap()
    with agent_session(c.config, "decrypt", target=os.path.abspath(path)) as agent:
        result = lifecycle.decrypt_folder(path, agent, progress)
    note(f"{result.folder}: decrypted {len(result.files)} file(s)")


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--deep", is_flag=True, help="New DEKs and re-encrypted data (default: only a new KEK).")
@click.option("--provider", help="Move the folder to this provider's new KEK (default: the same provider).")
@BACKGROUND
@RATE
@pass_ctx
def rekey(c, path, deep, provider, background, rate):
    """Rekey a VM folder: shallow (new KEK, instant) or --deep (new DEKs, data rewritten; online when mounted)."""
    if deep and (st := _online(c, path, "rekey", "rekey", provider, background, rate)) is not None:
        if not background:
            note(f"{st['folder']}: deep rekey done online ({st['done_bytes']} bytes rewritten in place)")
        return
    if not deep and (background or rate):
        raise UsageError("--background and --rate are for 'rekey --deep' (a shallow rekey only rewraps keys)")
    offline_heap()
    with agent_session(c.config, "rekey", target=os.path.abspath(path)) as agent:
        result = lifecycle.rekey_folder(path, agent, provider, deep, progress)
    old, new = result.old_kek, result.new_kek
    note(f"{result.folder}: {'deep' if deep else 'shallow'} rekey of {len(result.files)} file(s): "
               f"key {old.key_id} of {old.provider_id} -> key {new.key_id} of {new.provider_id}")
    note(f"the old key {old.key_id} is no longer used by this folder", err=True)


STATE_WORDS = {"encrypted": "encrypted", "damaged": "DAMAGED", "plain": "not encrypted"}


def reencrypt_line(r: dict) -> str:
    """One line for an in-place operation in flight: "re-encryption in progress: deep rekey, file X, 42.0 %"."""
    return (f"re-encryption in progress: {r['label']}{' (paused)' if r['paused'] else ''}"
            + (f", file {r['file']}" if r["file"] else "") + f", {r['percent']:.1f} %")


def _echo_folder(result: dict, indent: str = "") -> None:
    r = result.get("reencrypt")
    click.echo(f"{indent}{result.get('path', result['folder'])}: "
               + (reencrypt_line(r) if r else STATE_WORDS.get(result["state"], result["state"])))
    if r:
        click.echo(f"{indent}  {r['hint']}")
    if result["damage"]:
        click.echo(f"{indent}  {result['damage']}")
    if result["kek"]:
        click.echo(f"{indent}  folder key: {result['kek']['keyId']} (provider {result['kek']['provider']})")
        click.echo(f"{indent}  cipher: {result['cipher']}, sector size {result['sector_size']}")
    for f in result["files"]:
        where = f" key {f['kek']['keyId']} of {f['kek']['provider']} in {f['key_in']}" if f["kek"] else ""
        click.echo(f"{indent}  {f['name']:<32} {f['role']:<11} {f['size']:>14}{where}")


def _echo_datastore(result: dict) -> None:
    """The summary of a datastore root: one row per folder below it (issue 9)."""
    folders = result["folders"]
    encrypted = sum(1 for f in folders if f["state"] == "encrypted")
    damaged = sum(1 for f in folders if f["state"] == "damaged")
    moving = sum(1 for f in folders if f["reencrypt"])
    click.echo(f"{result['path']}: datastore, {len(folders)} folder(s), {encrypted} encrypted"
               + (f", {moving} being re-encrypted" if moving else "") + (f", {damaged} DAMAGED" if damaged else ""))
    if result["backing_path"] != result["path"]:
        click.echo(f"  (through the mount: at rest {result['backing_path']})")
    if result["state"] != "plain" or result["files"]:
        _echo_folder(dict(result, path="(the datastore root itself)"), "  ")
    pol = result.get("policy") or {}
    if pol.get("error"):
        click.echo(f"  policy for new folders: DAMAGED: {pol['error']}")
    elif pol.get("encrypt_new_folders"):
        click.echo(f"  policy: new folders are encrypted (provider {pol['provider'] or 'default'})")
    rows = [("FOLDER", "STATE", "PROVIDER", "KEY", "DISKS", "FILES")]
    for f in folders:
        kek = f["kek"] or {}
        rows.append((os.path.relpath(f["folder"], result["backing_path"]), f["state"], kek.get("provider", "-"),
                     kek.get("keyId", "-"), str(f["disks"]), str(f["file_count"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  " + "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    for f in folders:
        if f["reencrypt"]:
            click.echo(f"  {f['name']}: {reencrypt_line(f['reencrypt'])}; {f['reencrypt']['hint']}")
        if f["damage"]:
            click.echo(f"  {f['name']}: {f['damage']}")
    if verbose():
        for sub in folders:
            _echo_folder(sub, "  ")


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (README, \"Output for scripts\").")
def info(path, as_json):
    """Tell whether a file, folder or datastore is encrypted, under which key, and how each file is stored.

    On a datastore (a folder of VM folders), one line per VM folder: its state, provider and
    key, and how many disks and files it holds (--verbose: every file too).
    """
    result = inspect.info(path)
    if as_json:
        emit_json(result)
    elif result.get("datastore"):
        _echo_datastore(result)
    else:
        _echo_folder(result)
        if result["backing_path"] != result["path"]:
            click.echo(f"  (through the mount: at rest {result['backing_path']})")
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
    """Write the plaintext of one file (a core dump, an nvram file) to standard output."""
    out = click.get_binary_stream("stdout")
    with agent_session(c.config, "cat", target=os.path.abspath(file)) as agent:
        lifecycle.cat_file(file, agent, out.write)
    out.flush()


COMMANDS = [create, encrypt, decrypt, rekey, info, cat]
