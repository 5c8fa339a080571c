"""Mount orchestration: start the agent sidecar and the FUSE process, wait for the mount, unmount."""

import hashlib
import os
import select
import shutil
import subprocess
import sys

from . import disks
from .agent import AgentClient, start_agent
from .config import Config, runtime_dir
from .errors import MountError, UsageError, VmfsCryptError
from .procs import ReadyPipe, raise_for, spawn_detached
from .folder import VmFolder

MOUNT_TIMEOUT_S = 30.0
UMOUNT_TIMEOUT_S = 30.0


def _tag(mountpoint: str) -> str:
    return hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:12]


def pid_file(mountpoint: str) -> str:
    return os.path.join(runtime_dir(), f"mount-{_tag(mountpoint)}.pid")


def log_file(mountpoint: str) -> str:
    return os.path.join(runtime_dir(), f"mount-{_tag(mountpoint)}.log")


def is_mounted(mountpoint: str) -> bool:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4].encode().decode("unicode_escape") == target:
                return True
    return False


def parse_fuse_options(text: str | None, allow_other: bool) -> dict:
    options: dict = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        options[key.strip()] = value if value else True
    if "allow_other" in options and not allow_other:
        allow_other = True
    if allow_other:
        options["allow_other"] = True
        options.setdefault("default_permissions", True)  # with other users in, let the kernel check modes
    return options


def check_mount_args(datastore: str, mountpoint: str) -> None:
    if not os.path.isdir(datastore):
        raise UsageError(f"{datastore}: the datastore must be a directory")
    if not os.path.isdir(mountpoint):
        raise UsageError(f"{mountpoint}: the mount point must be an existing directory")
    if is_mounted(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point; unmount it first")
    if os.listdir(mountpoint):
        raise UsageError(f"{mountpoint} is not empty; mount on an empty directory")
    ds, mp = os.path.realpath(datastore), os.path.realpath(mountpoint)
    if mp == ds or mp.startswith(ds + os.sep):
        raise UsageError(f"{mountpoint} lies inside the datastore {datastore}; choose a mount point outside it")


def recover_datastore(datastore: str) -> list[str]:
    """Finish interrupted encrypt/decrypt operations in every folder before serving it."""
    notes = []
    for dirpath, dirnames, _ in os.walk(datastore):
        note = disks.recover(VmFolder(dirpath))
        if note:
            notes.append(note)
    return notes


PREFETCH_BUDGET_S = 10.0  # the mount waits at most this long for KEKs; the agent goes on fetching after it


def datastore_key_refs(datastore: str) -> list[dict]:
    """Each distinct KEK that the datastore's encrypted files are wrapped under, with those files."""
    refs: dict[tuple[str, str], list[str]] = {}
    for dirpath, _, _ in os.walk(datastore):
        folder = VmFolder(dirpath)
        if not folder.encrypted:
            continue
        for f in disks.folder_files(folder):
            if f.role == "encrypted":
                name = os.path.relpath(os.path.join(dirpath, f.name), datastore)
                refs.setdefault((f.provider, f.key_id), []).append(name)
    return [{"provider": p, "keyId": k, "disks": names} for (p, k), names in refs.items()]


def prefetch_keys(datastore: str, sock: str) -> None:
    """Have the agent fetch every KEK once now; a KEK it cannot get locks its disks, never the mount."""
    try:
        refs = datastore_key_refs(datastore)
        if not refs:
            return
        resp = AgentClient(sock).request("prefetch", keys=refs, budget_s=PREFETCH_BUDGET_S)
        print(f"prefetched {resp['fetched']} of {resp['keys']} key(s)"
              + (" (still fetching)" if resp["pending"] else ""), file=sys.stderr)
        for entry in resp["locked"]:
            print(f"LOCKED {', '.join(entry['disks'])}: {entry['error']}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - a failed prefetch only means keys are fetched on open
        print(f"warning: prefetching keys failed ({exc}); disks fetch their keys when opened", file=sys.stderr)


def ensure_agent(config: Config, socket_path: str | None) -> tuple[str, bool]:
    """(socket, started_here): use the named or running agent, or start a sidecar."""
    if socket_path:
        if not AgentClient(socket_path).alive():
            raise MountError(f"no key agent answers on {socket_path} (given by --agent)")
        return socket_path, False
    if AgentClient(config.agent_socket).alive():
        return config.agent_socket, False
    start_agent(config)
    return config.agent_socket, True


def mount_background(config: Config, datastore: str, mountpoint: str, agent_socket: str | None,
                     options_text: str | None, allow_other: bool) -> str:
    """Start the FUSE process detached and return once the mount is up (or fail with its log)."""
    check_mount_args(datastore, mountpoint)
    sock, sidecar = ensure_agent(config, agent_socket)
    os.makedirs(runtime_dir(), mode=0o700, exist_ok=True)
    log_path = log_file(mountpoint)
    cmd = [sys.executable, "-m", "vmfs_crypt.cli", "--config", config.path, "mount", "--foreground",
           "--agent", sock, datastore, mountpoint]
    if sidecar:
        cmd.append("--stop-agent-on-exit")
    if options_text:
        cmd += ["-o", options_text]
    if allow_other:
        cmd.append("--allow-other")
    proc, msg = spawn_detached(cmd, log_path, MOUNT_TIMEOUT_S)
    if msg == "ok":
        return log_path
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    if sidecar:
        AgentClient(sock).stop()
    tail = ""
    try:
        with open(log_path, "r", encoding="utf-8", errors="replace") as f:
            tail = "".join(f.readlines()[-5:]).strip()
    except OSError:
        pass
    if msg.startswith("error "):
        raise_for(msg, MountError, f"the mount failed; see {log_path}")
    raise MountError(f"the mount did not come up within {MOUNT_TIMEOUT_S:.0f} s: {tail or 'see ' + log_path}")


def run_foreground(config: Config, datastore: str, mountpoint: str, agent_socket: str | None,
                   options_text: str | None, allow_other: bool, ready_fd: int | None, stop_agent_on_exit: bool) -> None:
    """Serve the mount in this process (what the detached child runs)."""
    from .fs import serve_mount  # only this path loads FUSE
    from .hardening import disable_core_dumps

    ready = ReadyPipe(ready_fd)
    try:
        disable_core_dumps()
        check_mount_args(datastore, mountpoint)
        for note in recover_datastore(datastore):
            print(note, file=sys.stderr)
        sock, sidecar = ensure_agent(config, agent_socket)
        stop_agent_on_exit = stop_agent_on_exit or sidecar
    except Exception as exc:
        ready.error(exc, None if isinstance(exc, VmfsCryptError) else MountError)
        raise
    prefetch_keys(datastore, sock)
    os.makedirs(runtime_dir(), mode=0o700, exist_ok=True)
    pid_path = pid_file(mountpoint)
    with open(pid_path, "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n")
    try:
        serve_mount(datastore, mountpoint, sock, parse_fuse_options(options_text, allow_other),
                    ready.ok)
    except Exception as exc:
        ready.error(MountError(f"{mountpoint}: FUSE mount failed ({exc})"))
        raise MountError(f"{mountpoint}: FUSE mount failed ({exc})") from None
    finally:
        ready.error(MountError("the FUSE loop ended before the mount came up"))
        try:
            os.unlink(pid_path)
        except FileNotFoundError:
            pass
        if stop_agent_on_exit:
            AgentClient(sock).stop()


def umount(mountpoint: str) -> None:
    if not is_mounted(mountpoint):
        raise MountError(f"{mountpoint} is not mounted")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", mountpoint] if tool else ["umount", mountpoint]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MountError(f"{mountpoint}: unmount failed: {proc.stderr.strip() or proc.stdout.strip()} "
                         "(is a program still using it? see 'fuser -m')")
    # Wait for the FUSE process to exit so that the datastore is quiet when we return.
    try:
        with open(pid_file(mountpoint), encoding="utf-8") as f:
            pid = int(f.read().strip() or 0)
        pidfd = os.pidfd_open(pid)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return
    try:
        select.select([pidfd], [], [], UMOUNT_TIMEOUT_S)
    finally:
        os.close(pidfd)
