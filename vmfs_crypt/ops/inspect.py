"""`info`: like vSphere's crypto-util, what a file, folder or datastore is and how each file is stored.

A path inside a running mount is answered for the datastore behind it (issue 7, case 11).
Field names are stable (README, "Output for scripts").
"""

import os

from ..crypto.sectors import SECTOR_SIZE
from ..errors import DataError, FormatError, UsageError, VmfsCryptError
from ..format.descriptor import read_descriptor
from ..format.dspolicy import policy_path, read_policy
from ..format.folder import FOLDER_KEYS_NAME, JOURNAL_NAME, FolderState, VmFolder
from ..format.journal import journal_problem
from ..format.inventory import folder_files, walk_folders
from ..format.keysafe import CIPHER_NAME
from ..fs.mounts import backing_path
from . import online

# A folder whose in-place encrypt, decrypt or deep rekey is in flight (FORMAT.md 7.8): neither
# encrypted nor damaged, and not plain; `reencrypt` says which operation, how far, and where it runs.
REENCRYPTING = "reencrypting"
LABEL = {"encrypt": "encrypt", "decrypt": "decrypt", "rekey": "deep rekey"}


def _damage_code(folder: VmFolder) -> str:
    """The stable error code (errors.py) of a damaged folder: a refused journal is a format error, lost keys data."""
    if os.path.lexists(os.path.join(folder.backing_dir, JOURNAL_NAME)) and journal_problem(folder):
        return FormatError.code
    return DataError.code


def key_location(key_in: str | None) -> str | None:
    """Where a file's wrapped DEK lives, as one stable word: "descriptor", "folder" (.vmfs-crypt.json) or None."""
    if key_in is None:
        return None
    return "folder" if key_in == FOLDER_KEYS_NAME else "descriptor"


def _file_json(info) -> dict:
    """A file's entry: the KEK is always "kek" (issue 9), with key_location saying where its record lives;
    a file stored in plaintext has cipher null."""
    out = info.as_json()
    out["key_location"] = key_location(out["key_in"])
    out["cipher"] = CIPHER_NAME if out["role"] == "encrypted" else None
    return out


def _disk_count(folder: VmFolder, files: list[dict]) -> int:
    """Disks of a folder: every .vmdk that is not an extent named by another descriptor."""
    try:
        owners = folder.extent_owners()
    except VmfsCryptError:
        owners = {}
    return sum(1 for f in files if f["name"].lower().endswith(".vmdk") and owners.get(f["name"], f["name"]) == f["name"])


def _in_flight(folder: VmFolder):
    """The folder's in-place re-encryption in flight (a valid FORMAT.md 7.8 state), else None; an invalid
    state raises, as every reader must refuse it (the folder is damaged then)."""
    return folder.load_keys(allow_reencrypt=True).reencrypt


def _live_status(folder_dir: str) -> tuple[str | None, dict | None]:
    """(datastore, the mount's status of the folder's operation) when a vmfs-crypt mount serves it; the status
    is None when that mount carries out no operation there, or is not ours to ask (another user's)."""
    datastore = online.mounted_datastore(folder_dir)
    if datastore is None:
        return None, None
    try:
        resp = online.request(datastore, {"cmd": "status"}, timeout_s=5.0)
    except (OSError, ValueError, VmfsCryptError):
        return datastore, None
    ops = resp.get("ops", []) if resp and resp.get("ok") else []
    real = os.path.realpath(folder_dir)
    return datastore, next((o for o in ops if o["folder"] == real), None)


def reencrypt_info(folder: VmFolder, state) -> dict:
    """What `info` says of an in-place operation in flight: which, how far (from the state at rest, which the
    writer updates region by region, or the mount's own figures), and who carries it out or resumes it."""
    total = sum(f.size for f in state.files)
    done = sum(f.boundary for f in state.files)
    current = state.current()
    command = f"vmfs-crypt {'abort' if state.aborting else 'rekey --deep' if state.op == 'rekey' else state.op} " \
        f"{folder.backing_dir}"  # an abort in flight only ever goes on back (FORMAT.md 7.8)
    datastore, live = _live_status(folder.backing_dir)
    running = live is not None and live["state"] in ("starting", "running", "paused", "aborting")
    if running:
        where = "online"
        hint = f"carried out online by the mount of {datastore}" + (" (paused: 'vmfs-crypt resume' goes on)"
                                                                     if live["state"] == "paused" else "")
    elif datastore is not None:
        where = "interrupted"
        why = f" ({live['error']})" if live is not None and live.get("error") else ""
        hint = (f"interrupted{why}: the mount of {datastore} serves none of its encrypted files; "
                f"'{command}' resumes it (through the mount), as does the next mount")
    else:
        where = "at-rest"
        hint = (f"interrupted at rest: 'vmfs-crypt mount' of the datastore resumes it online, "
                f"or '{command}' offline")
    label = f"abort of the {LABEL[state.op]}" if state.aborting else LABEL[state.op]
    return {"op": state.op, "label": label, "aborting": state.aborting, "command": command, "where": where,
            "paused": bool(running and live["state"] == "paused"),
            "file": (live.get("file") if running and live.get("file") else None) or (current.name if current else None),
            "done_bytes": done, "total_bytes": total,
            "percent": round(100.0 * done / total, 1) if total else 100.0,
            "kek_after": state.kek.to_json() if state.kek else None, "hint": hint}


def folder_info(folder: VmFolder) -> dict:
    """One folder: its state, why it is damaged and how to repair it, its KEK, and each file's role."""
    state = folder.state()
    damaged = state is FolderState.DAMAGED
    result = {"folder": folder.backing_dir, "name": os.path.basename(folder.backing_dir), "state": state.value,
              "encrypted": state is FolderState.ENCRYPTED,
              "damage": folder.damage() if damaged else None, "damage_code": _damage_code(folder) if damaged else None,
              "cipher": CIPHER_NAME if state is not FolderState.PLAIN else None,
              "sector_size": SECTOR_SIZE, "kek": None, "disks": 0, "file_count": 0, "files": [], "reencrypt": None}
    try:
        if state is FolderState.ENCRYPTED:
            flight = _in_flight(folder)
            if flight is not None:
                # Every byte is under the old or the new key: encrypted only for a deep rekey.
                result.update(state=REENCRYPTING, encrypted=flight.op == "rekey",
                              reencrypt=reencrypt_info(folder, flight))
                folder.allow_reencrypt = True  # listing only: the files of the operation are shown as such
            result["kek"] = folder.load_keys().kek.to_json()
        result["files"] = [_file_json(f) for f in folder_files(folder)]
        if result["reencrypt"] is not None:
            for f in result["files"]:
                entry = flight.entry(f["name"])
                if entry is not None:
                    f.update(role=REENCRYPTING, reencrypt={"boundary": entry.boundary, "size": entry.size})
        result["disks"], result["file_count"] = _disk_count(folder, result["files"]), len(result["files"])
    except VmfsCryptError as exc:
        result.update(state=FolderState.DAMAGED.value, encrypted=False, damage=str(exc), damage_code=exc.code,
                      reencrypt=None)
    return result


def info(path: str) -> dict:
    """What `vmfs-crypt info PATH` says, as a dict."""
    shown = os.path.abspath(path)
    real = os.path.abspath(backing_path(shown))
    if os.path.isdir(real) and not os.path.islink(real):
        folder, only = VmFolder(real), None
    elif os.path.lexists(real):
        folder, only = VmFolder(os.path.dirname(real)), os.path.basename(real)
    else:
        raise UsageError(f"{path}: no such file or folder")
    result = {"path": shown, "backing_path": real}
    result.update(folder_info(folder))
    if only is not None:
        wanted = {only}
        desc = read_descriptor(real) if only.lower().endswith(".vmdk") else None
        if desc is not None:
            wanted |= {e.file_name for e in desc.extents}
            try:
                record = desc.key_record()
                result["disk"] = {"descriptor": only, "extents": [e.file_name for e in desc.extents],
                                  "kek": record.keysafe.kek.to_json() if record else None,
                                  "key_location": "descriptor" if record else None}
            except VmfsCryptError as exc:
                result["disk"] = {"descriptor": only, "extents": [e.file_name for e in desc.extents],
                                  "kek": None, "key_location": None, "error": str(exc)}
        result["files"] = [f for f in result["files"] if f["name"] in wanted]
        disk = result.get("disk")
        if disk is not None and disk["kek"] is None and "error" not in disk:
            # A disk whose key records are in the folder key file (sparse, multi-extent): the same two fields
            keyed = [f for f in result["files"] if f["kek"]]
            if keyed:
                disk.update(kek=keyed[0]["kek"], key_location=keyed[0]["key_location"])
        result["file_count"] = len(result["files"])
        result["disks"] = _disk_count(folder, result["files"])
    result["datastore"] = only is None and _is_datastore_root(folder)
    if result["datastore"]:
        try:
            pol = read_policy(folder.backing_dir)
            result["policy"] = {"encrypt_new_folders": pol.encrypt_new_folders, "provider": pol.provider, "error": None}
        except VmfsCryptError as exc:  # reported, not fatal: info is how one finds out
            result["policy"] = {"encrypt_new_folders": None, "provider": None, "error": str(exc)}
        result["folders"] = [folder_info(f) for f in walk_folders(folder.backing_dir)
                             if f.backing_dir != folder.backing_dir]
    return result


def _is_datastore_root(folder: VmFolder) -> bool:
    """A folder that holds VM folders, or a datastore policy file: summarised folder by folder (issue 9)."""
    if os.path.lexists(policy_path(folder.backing_dir)):
        return True
    try:
        return any(e.is_dir(follow_symlinks=False) for e in os.scandir(folder.backing_dir))
    except OSError:
        return False


def folders_using(provider: str, datastores: list[str]) -> tuple[list[str], list[str]]:
    """(folders, unreadable): the encrypted folders of `datastores` whose keys come from `provider`
    (provider remove refuses; issue 9), and the folders this user could not read to tell.

    A folder counts if its KEK, or the KEK of any file record in it, is the provider's; a
    damaged folder whose key file cannot be parsed counts too (it may be the provider's: fail closed).
    """
    out, unreadable = [], []
    for ds in dict.fromkeys(os.path.abspath(d) for d in datastores):
        for folder in walk_folders(ds):
            try:
                state = folder.state()
                if state is FolderState.PLAIN:
                    continue
                try:
                    uses = {folder.load_keys().kek.provider_id} if state is FolderState.ENCRYPTED else {None}
                    uses |= {f.kek.provider_id for f in folder_files(folder) if f.kek}
                except VmfsCryptError:
                    uses = {None}
            except OSError:  # another user's datastore (e.g. the root agent's): say so, do not guess
                unreadable.append(folder.backing_dir)
                continue
            if provider in uses or None in uses:
                out.append(folder.backing_dir)
    return out, unreadable
