"""Online operations from the command line: hand encrypt/decrypt/rekey --deep to the running mount, wait with progress; pause, resume, abort, status."""

import os
import time

import click

from ..agent.launcher import agent_session
from ..errors import DataError, InUseError, UsageError, VmfsCryptError
from ..ops import lifecycle, online
from .common import emit_json, note, offline_heap, pass_ctx, progress

POLL_S = 0.25  # how often a waiting command asks the mount how far it is (display only)
LABEL = {"encrypt": "encrypting", "decrypt": "decrypting", "rekey": "deep rekey"}
NAME = {"encrypt": "encrypt", "decrypt": "decrypt", "rekey": "deep rekey"}


def parse_rate(text: str | None) -> int | None:
    """`--rate 200M`: bytes per second (K, M, G; a plain number is bytes)."""
    if text is None:
        return None
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("/S").removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        rate = int(float(num) * units[unit])
    except ValueError:
        rate = 0
    if rate <= 0:
        raise UsageError(f"--rate {text!r} is not a rate such as 200M (bytes per second)")
    return rate


def online_target(path: str) -> tuple[str, str] | None:
    """(datastore, folder at rest) when PATH's folder lies in a datastore that a vmfs-crypt mount serves, else None."""
    folder = lifecycle.target_folder(path).backing_dir
    datastore = online.mounted_datastore(folder)
    if datastore is None:
        return None
    return datastore, os.path.realpath(folder)


def run_online(target: tuple[str, str], op: str, provider: str | None, background: bool,
               rate: int | None) -> dict | None:
    """Have the mount carry out `op` on the folder; its final status (None: no mount of ours answers, go offline)."""
    datastore, folder = target
    resp = online.request(datastore, {"cmd": "start", "op": op, "folder": folder, "provider": provider, "rate": rate})
    if resp is None:
        return None
    if not resp.get("ok"):
        raise InUseError(f"{folder}: the mount refused the online {op}: {resp.get('error')}")
    if background:
        note(f"{folder}: online {op} started in the mount of {datastore}; 'vmfs-crypt status' shows it")
        return resp["op"]
    return wait(datastore, folder, op)


def _find(datastore: str, folder: str) -> dict | None:
    resp = online.request(datastore, {"cmd": "status"})
    if resp is None:
        raise InUseError(f"the mount of {datastore} went away during the online operation on {folder}; "
                         "the next mount resumes it")
    return next((o for o in resp.get("ops", []) if o["folder"] == folder), None)


RUNNING = ("starting", "running", "paused", "aborting")


def wait(datastore: str, folder: str, op: str, abort: bool = False) -> dict:
    """Show the operation's progress until it ends; raise if it failed or stopped.

    `abort`: waiting for `vmfs-crypt abort`, whose success is the state "aborted" (and the
    progress shown is the way back); a waiter of the operation itself fails on "aborted".
    """
    st = _find(datastore, folder)
    shown = 0
    bar = None
    try:
        while st is not None and st["state"] in RUNNING:
            if bar is None and st["total_bytes"] and (not abort or st["state"] == "aborting"):
                bar = progress(st["total_bytes"], ("aborting the " + NAME[op] if abort else LABEL[op]) + " (online)")
                bar.__enter__()
            if bar is not None and st["done_bytes"] > shown:
                bar.update(st["done_bytes"] - shown)
                shown = st["done_bytes"]
            time.sleep(POLL_S)
            st = _find(datastore, folder)
        if bar is not None and st is not None and st["state"] == ("aborted" if abort else "done"):
            bar.update(max(st["done_bytes"] - shown, 0))
            bar.__exit__(None, None, None)
            bar = None
    except KeyboardInterrupt:
        note(f"{folder}: the online {'abort of the ' + op if abort else op} goes on in the mount; "
             "'vmfs-crypt status' shows it", err=True)
        raise
    finally:
        if bar is not None:
            bar.__exit__(RuntimeError, None, None)
    if st is None:
        raise InUseError(f"{folder}: the mount lost track of the online {op}")
    if st["state"] == "failed":
        raise DataError(f"{folder}: the online {op} stopped: {st['error']}")
    if st["state"] == "stopped":
        raise InUseError(f"{folder}: the online {'abort of the ' + op if abort else op} stopped with the mount; "
                         "the next mount resumes it")
    if st["state"] == "aborted" and not abort:
        raise VmfsCryptError(f"{folder}: the online {op} was aborted ('vmfs-crypt abort'); the folder is under its "
                             "old keys")
    if st["state"] == "done" and abort:
        raise VmfsCryptError(f"{folder}: the online {op} finished before the abort took effect; the folder is under "
                             "its new keys")
    return st


def all_operations() -> list[dict]:
    """The online operations of every vmfs-crypt mount of ours that answers."""
    out = []
    for m in online.vmfs_mounts():
        try:
            resp = online.request(m.datastore, {"cmd": "status"}, timeout_s=5.0)
        except (OSError, ValueError, InUseError):
            continue
        if resp and resp.get("ok"):
            out.extend(resp["ops"])
    return out


def resumed_operations(datastore: str) -> list[dict]:
    """The interrupted operations the mount of `datastore` found when it started and resumes online (issue 10)."""
    try:
        resp = online.request(datastore, {"cmd": "status"}, timeout_s=5.0)
    except (OSError, ValueError, InUseError):
        return []
    return [o for o in resp["ops"] if o.get("resumed")] if resp and resp.get("ok") else []


def command_of(op: str) -> str:
    """The command that carries out (or resumes) an operation: 'rekey --deep' for a deep rekey."""
    return "rekey --deep" if op == "rekey" else op


def echo_operations(ops: list[dict]) -> None:
    for o in ops:
        what = f"  online {'deep rekey' if o['op'] == 'rekey' else o['op']} of {o['folder']}: {o['state']}"
        if o["state"] in RUNNING:
            what += (f", {o['percent']:.1f} % of {o['total_bytes'] / 1e6:.1f} MB, file {o['file']}, "
                     f"{o['bytes_per_s'] / 1e6:.1f} MB/s, ETA {o['eta_s']:.0f} s")
            if o.get("rate"):
                what += f", limited to {o['rate'] / 1e6:.1f} MB/s"
        elif o["error"]:
            what += f": {o['error']}"
            if o["state"] == "failed":
                again = "abort" if o.get("aborting") else command_of(o["op"])
                what += f"; 'vmfs-crypt {again} {o['folder']}' resumes it once that is repaired"
        click.echo(what)


def _control(path: str, cmd: str, **fields) -> dict:
    target = online_target(path)
    if target is None:
        raise UsageError(f"{path}: not in a mounted datastore; only the mount runs operations that can be paused")
    resp = online.request(target[0], dict(fields, cmd=cmd, folder=target[1]))
    if resp is None:
        raise UsageError(f"the mount of {target[0]} has no control socket of yours (mounted by another user?)")
    if not resp.get("ok"):
        raise UsageError(f"{target[1]}: {resp.get('error')}")
    return resp["op"]


@click.command("pause")
@click.argument("path", type=click.Path(exists=True))
@pass_ctx
def pause(c, path):
    """Pause the online encrypt, decrypt or deep rekey of PATH's folder (after its region in flight)."""
    st = _control(path, "pause")
    note(f"{st['folder']}: online {st['op']} paused at {st['percent']:.1f} %")


@click.command("resume")
@click.argument("path", type=click.Path(exists=True))
@click.option("--rate", help="Limit it to this many bytes per second from now on, e.g. 200M.")
@pass_ctx
def resume(c, path, rate):
    """Resume a paused online operation of PATH's folder (and/or change its --rate)."""
    if rate is not None:
        _control(path, "rate", rate=parse_rate(rate))
    st = _control(path, "resume")
    note(f"{st['folder']}: online {st['op']} running, {st['percent']:.1f} % done")


def _purpose(op: str) -> str:
    """An abort reads the data under both keys, as a resume does (ops/reencrypt.resume): that privilege."""
    return "rekey" if op == "rekey" else "decrypt"


def _abort_online(c, target: tuple[str, str], background: bool) -> dict:
    datastore, folder = target
    st = _find(datastore, folder)
    state = None if st is not None and st["state"] in RUNNING else _state_at_rest(folder)
    op = st["op"] if st is not None and st["state"] in RUNNING else state.op if state is not None else None
    if op is None:
        raise UsageError(f"{folder}: no encrypt, decrypt or deep rekey is in flight there; nothing to abort")
    with agent_session(c.config, _purpose(op), target=folder):  # the privilege check and its audit record
        resp = online.request(datastore, {"cmd": "abort", "folder": folder})
    if resp is None:
        raise UsageError(f"the mount of {datastore} has no control socket of yours (mounted by another user?)")
    if not resp.get("ok"):
        error = str(resp.get("error"))
        cls = UsageError if resp.get("code") == "usage" else InUseError
        raise cls(error if error.startswith(folder) else f"{folder}: {error}")
    op = resp["op"]["op"]
    if background:
        note(f"{folder}: the online {NAME[op]} goes back to the old keys in the mount of {datastore}; "
             "'vmfs-crypt status' shows it")
        return resp["op"]
    return wait(datastore, folder, op, abort=True)


def _state_at_rest(folder: str):
    f = lifecycle.target_folder(folder)
    return f.load_keys(allow_reencrypt=True).reencrypt if f.encrypted else None


@click.command("abort")
@click.argument("path", type=click.Path(exists=True))
@click.option("--background", is_flag=True,
              help="With the datastore mounted: have the mount abort it and return at once.")
@pass_ctx
def abort(c, path, background):
    """Abort the in-place encrypt, decrypt or deep rekey of PATH's folder: every file goes back under its old key.

    With the datastore mounted, the mount aborts the operation that runs (or is paused) there
    online, while the disks stay in use; otherwise the abort runs here, with progress. Either
    way it rewrites, region by region, what the operation had done, and is resumed like the
    operation itself when interrupted (the next mount, or 'vmfs-crypt abort' again).
    """
    target = online_target(path)
    if target is not None:
        st = _abort_online(c, target, background)
        if not background:
            note(f"{st['folder']}: the online {NAME[st['op']]} was aborted; the folder is under its old keys "
                 f"({st['done_bytes']} bytes rewritten back in place)")
        return
    if background:
        raise UsageError(f"{path}: --background needs the datastore mounted (the mount runs the abort online)")
    state = _state_at_rest(path)
    if state is None:
        raise UsageError(f"{lifecycle.target_folder(path).backing_dir}: no encrypt, decrypt or deep rekey is in "
                         "flight there; nothing to abort")
    offline_heap()
    with agent_session(c.config, _purpose(state.op), target=os.path.abspath(path)) as agent:
        result = lifecycle.abort_folder(path, agent, progress)
    plain = result.op == "encrypt" and not lifecycle.target_folder(path).encrypted
    note(f"{result.folder}: the in-place {NAME[result.op]} was aborted; {len(result.files)} file(s) under their "
         "old keys again" + (" (the folder is plain again)" if plain else ""))


@click.command("operations")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--wait", is_flag=True, help="First wait until none is running or paused (e.g. the resumes of a "
              "mount); exit non-zero if one failed or stopped.")
@pass_ctx
def operations(c, as_json, wait):
    """List the online operations of the datastores you have mounted (also part of 'vmfs-crypt status')."""
    ops = all_operations()
    while wait and any(o["state"] in RUNNING for o in ops):
        time.sleep(POLL_S)
        ops = all_operations()
    if as_json:
        emit_json({"operations": ops})
    elif not ops:
        click.echo("no online operation")
    else:
        echo_operations(ops)
    bad = [o for o in ops if o["state"] in ("failed", "stopped")]
    if wait and bad:
        raise DataError(f"{len(bad)} online operation(s) did not finish: "
                        + "; ".join(f"{o['folder']} ({o['error'] or o['state']})" for o in bad))


COMMANDS = [pause, resume, abort, operations]
