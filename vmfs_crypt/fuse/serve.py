"""The mount process: prepare the datastore (lock, recovery, agent, KEK prefetch), then run the FUSE loop."""

import logging
import os
import sys
import threading

from ..agent.client import AgentClient
from ..agent.launcher import shared_agent
from ..config import Config
from ..errors import MountError, VmfsCryptError
from ..format.inventory import datastore_key_refs, recover_datastore
from ..format.keysafe import KeyRef
from ..fs.core import VmfsCore
from ..fs.dslock import DatastoreLock
from ..fs.mounts import SUBTYPE, check_mount_args, is_mounted
from ..procs import ReadyPipe
from ..sysutil import cap_malloc_arenas, disable_core_dumps

log = logging.getLogger("vmfs_crypt.mount")
PREFETCH_BUDGET_S = 10.0  # the mount waits at most this long for KEKs; the agent goes on fetching after it
REVOKE_POLL_S = 2.0


def parse_fuse_options(text: str | None, allow_other: bool) -> dict:
    """-o a,b=1,...: flags become True, numbers int (libfuse 3 takes some into a config struct)."""
    options: dict = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        options[key.strip()] = (int(value) if value.isdigit() else value) if value else True
    if "allow_other" in options:
        allow_other = True
    if allow_other:
        options["allow_other"] = True
        options.setdefault("default_permissions", True)  # with other users in, let the kernel check modes
    return options


def prefetch_keys(datastore: str, agent: AgentClient) -> None:
    """Have the agent fetch every KEK once now; a KEK it cannot get locks its disks, never the mount."""
    try:
        refs = datastore_key_refs(datastore)
        if not refs:
            return
        resp = agent.request("prefetch", keys=refs, budget_s=PREFETCH_BUDGET_S)
        log.info("prefetched %d of %d key(s)%s", resp["fetched"], resp["keys"],
                 " (still fetching)" if resp["pending"] else "")
        for entry in resp["locked"]:
            log.warning("LOCKED %s: %s", ", ".join(entry["disks"]), entry["error"])
    except (VmfsCryptError, OSError) as exc:  # a failed prefetch only means keys are fetched on open
        log.warning("prefetching keys failed (%s); disks fetch their keys when opened", exc)


def watch_revocations(core: VmfsCore, agent: AgentClient, stop: threading.Event) -> None:
    """Every REVOKE_POLL_S, learn from the agent which KEKs were revoked under on_revoke = "lock"."""
    while not stop.wait(REVOKE_POLL_S):
        try:
            locked = agent.locked()
        except (VmfsCryptError, OSError):
            continue
        revoked = {KeyRef(str(e["provider"]), str(e["keyId"])) for e in locked if e.get("lock_open")}
        new = core.set_revoked(revoked)
        if new:
            log.warning("revoked, disks under them locked now: %s", ", ".join(map(str, new)))


def _when_live(mountpoint: str, on_ready) -> None:
    """Report readiness once the kernel routes requests to us: libfuse may still refuse the
    session after `init` (libfuse 3.14 did so for max_read), so `init` alone proves nothing.

    libfuse mounts before it reads the INIT request, and the kernel holds every other request
    until INIT is answered: a stat of the mount point from another thread returns exactly
    when the session is live, or fails when libfuse refused it.
    """
    def wait() -> None:
        try:
            if not is_mounted(mountpoint):
                raise OSError(f"{mountpoint} is not in the mount table")
            os.stat(mountpoint)  # answered by one of our own workers
        except OSError as exc:
            log.error("%s: the mount did not come up: %s", mountpoint, exc)
            return
        on_ready()
    threading.Thread(target=wait, daemon=True, name="ready").start()


class FuseMessages:
    """What libfuse writes to stderr while it starts (an unknown option, a refused mount):
    caught in a memfd so that the mount's error names it (issue 9: `-o bogusopt` said only
    "FUSE mount failed (1)"), and copied to the real stderr (the log) when the mount is live."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._memfd = os.memfd_create("fuse-stderr", os.MFD_CLOEXEC)
        os.dup2(self._memfd, 2)

    def release(self) -> str:
        """Give fd 2 back, copy what was caught there, and return it (once; "" afterwards)."""
        with self._lock:
            if self._saved is None:
                return ""
            sys.stderr.flush()
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._saved = None
            data = os.pread(self._memfd, 1 << 16, 0)
            os.close(self._memfd)
        if data:
            os.write(2, data if data.endswith(b"\n") else data + b"\n")
        return data.decode("utf-8", "replace").strip()


def serve_fuse(core: VmfsCore, mountpoint: str, fuse_options: dict, on_ready) -> None:
    """Run the FUSE loop in this process until unmounted (multithreaded, foreground)."""
    import mfusepy  # the FUSE library loads only in the mount process

    from .adapter import FuseOperations, VmfsFuse
    # findmnt shows type fuse.vmfs-crypt and the datastore as source (issue 9); a comma would
    # end libfuse's option, so it is escaped.
    options = {"fsname": core.root.replace("\\", "\\\\").replace(",", "\\,"), "subtype": SUBTYPE, "use_ino": True}
    if mfusepy.fuse_version_major == 2:
        # Without big_writes libfuse 2 splits buffered writes into 4 KiB requests: qemu-img
        # convert into the mount ran at 46 MiB/s, with it at 213 MiB/s (docs/PERFORMANCE.md).
        options["big_writes"] = True
    # Hard links are two nodes to libfuse's path API: with cached attributes, a link, chmod or
    # chown through one name left the other's st_nlink, mode and owner stale (pjdfstest link/00,
    # rename/00; issue 12). Attributes are asked for at each stat; -o attr_timeout=N overrides.
    options["attr_timeout"] = 0
    options.update(fuse_options)
    max_read = options.get("max_read")
    log.info("libfuse %d.%d", mfusepy.fuse_version_major, mfusepy.fuse_version_minor)
    messages = FuseMessages()
    was_live = threading.Event()

    def live() -> None:
        messages.release()
        was_live.set()
        on_ready()
    ops = FuseOperations(core, on_init=lambda: _when_live(mountpoint, live),
                         max_read=int(max_read) if max_read else None)
    # glibc gives each thread that mallocs its own arena; libfuse's worker threads would each
    # keep the freed buffers of large requests in theirs. Two arenas bound the peak RSS.
    cap_malloc_arenas(2)
    try:
        if core.datapath.name == "native":
            from .native import serving_natively
            with serving_natively():
                VmfsFuse(ops, mountpoint, foreground=True, nothreads=False, **options)
        else:
            VmfsFuse(ops, mountpoint, foreground=True, nothreads=False, **options)
    except RuntimeError as exc:  # mfusepy: fuse_main returned non-zero
        if was_live.is_set():
            # libfuse ends a live loop with the signal's number on SIGTERM/SIGINT/SIGHUP (systemctl
            # stop), after unmounting: a normal stop.
            log.info("the FUSE loop ended (%s): unmounted", exc)
            return
        said = messages.release()
        raise MountError(f"{mountpoint}: FUSE mount failed: {said}" if said
                         else f"{mountpoint}: FUSE mount failed ({exc})") from None
    finally:
        messages.release()


def run_mount(config: Config, datastore: str, mountpoint: str, agent_socket: str | None, options_text: str | None,
              allow_other: bool, ready: ReadyPipe, services=None) -> None:
    """Serve the mount in this process (the detached child of `vmfs-crypt mount`, or --foreground).

    `services(core, datastore, agent_socket)` starts what runs beside FUSE (the control socket of
    online operations, ops/online.py, which this layer does not import) and returns an object
    with `live(ready)`, called once the mount is live and readiness was reported (the online
    resume of interrupted operations starts there: issue 10, never before systemd's READY=1),
    and `stop()`.
    """
    # The mount table holds absolute paths: a relative MOUNTPOINT was never found there (issue 9).
    datastore, mountpoint = os.path.abspath(datastore), os.path.abspath(mountpoint)
    lock = DatastoreLock(os.path.realpath(datastore) if os.path.isdir(datastore) else datastore)
    stop = threading.Event()
    try:
        disable_core_dumps()
        check_mount_args(datastore, mountpoint)
        lock.acquire(mountpoint)
        for note in recover_datastore(datastore):
            log.info("%s", note)
        if agent_socket:
            agent = AgentClient(agent_socket, purpose="mount")  # issue 11: the agent checks the mount privilege
            if not agent.alive():
                raise MountError(f"no key agent answers on {agent_socket} (given by --agent)")
        else:
            sock, _ = shared_agent(config, sidecar=True)
            agent = AgentClient(sock, purpose="mount")
        # A sidecar agent stops when its last holder (mount) exits; a named agent is not stopped by us.
        agent.hold(f"mount of {os.path.realpath(datastore)} at {os.path.realpath(mountpoint)}")
        prefetch_keys(datastore, agent)
        core = VmfsCore(datastore, agent)
        options = parse_fuse_options(options_text, allow_other)
    except Exception as exc:
        lock.release()
        ready.error(exc, MountError)
        raise
    threading.Thread(target=watch_revocations, args=(core, agent, stop), daemon=True, name="revocations").start()
    running = None

    def live() -> None:
        ready.ok()  # first: a long resume must not hold back READY=1 (systemd's start time-out)
        if running is not None:
            running.live(ready)
    try:
        if services is not None:
            running = services(core, datastore, agent.socket_path)
        serve_fuse(core, mountpoint, options, live)
    except MountError as exc:
        ready.error(exc)
        raise
    except Exception as exc:
        err = MountError(f"{mountpoint}: FUSE mount failed ({exc})")
        ready.error(err)
        raise err from None
    finally:
        ready.stopping()
        stop.set()
        ready.error(MountError("the FUSE loop ended before the mount came up"))
        if running is not None:
            running.stop()  # an online operation stops after its region in flight; the next mount resumes it
        stats = core.datapath_stats()
        if stats:
            log.info("data path %s served %s", core.datapath.name, ", ".join(f"{k} {v}" for k, v in stats.items()))
        core.close()
        lock.release()
        print(f"unmounted {mountpoint}", file=sys.stderr)
