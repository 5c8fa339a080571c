"""Online encrypt, decrypt and deep rekey, carried out by the running mount while its disks are in use (issue 10).

The mount process runs a control socket (`ControlServer`, started by the mount's entry
point); `vmfs-crypt encrypt|decrypt|rekey --deep PATH` of a mounted datastore sends it the
request, and `status`, `pause`, `resume` and `--rate` talk to it too. The operation is the
in-place algorithm of the offline commands (ops/reencrypt.py, FORMAT.md 7.8), with the
same state at rest, so a SIGKILL of the mount leaves a folder the next mount resumes. What
differs online: every file of the operation is served under a split key (fs/online.py) whose
boundary follows the rewrite; each region is the file's hot zone while it is rewritten (set
and cleared under the file's write lock): guest I/O touching it waits, the rest of the file
is served meanwhile, and no write is lost (a guest write to the region lands before it is
read, or after it is rewritten, under the key of its side of the boundary);
the folder's names do not change while it runs; and every key goes to the folder key file
(open descriptor views are not rewritten). `vmfs-crypt abort` turns a running, paused or
interrupted operation back: the same regions rewritten in reverse, each boundary back to 0,
and the old keys committed (FORMAT.md 7.8, "Aborting").
"""

import hashlib
import json
import logging
import os
import socket
import stat
import threading
import time

from ..agent.client import AgentClient
from ..crypto.sectors import SECTOR_SIZE
from ..crypto.xts import SectorCipher
from ..errors import DataError, InUseError, UsageError, VmfsCryptError
from ..format.folder import FolderKeys, VmFolder
from ..format.inventory import folder_files
from ..format.reencrypt import remove_region
from ..fs import online as held_files
from ..fs.dslock import lock_info
from ..fs.locks import HOT_TO_END
from ..fs.mounts import vmfs_mounts
from ..runtime import ensure_runtime_dir, runtime_dir
from ..sysutil import peer_credentials
from . import lifecycle, reencrypt
from .transaction import FolderTransaction

log = logging.getLogger("vmfs_crypt.online")

# Online regions are smaller than offline ones: guest I/O into the region being rewritten (its
# hot zone) waits for the rest of its rewrite, so a random workload's mean wait grows with the
# region's size squared; 1 MiB keeps the guest's IOPS at the issue's target at full operation
# speed where 4 MiB did not (docs/PERFORMANCE.md, Online operations).
ONLINE_REGION_SIZE = 1 << 20
MAX_REQUEST = 64 * 1024
# The engine's thread runs at this nice value: when the host's CPUs are contended, the guests'
# I/O (served by libfuse's threads at the mount's own priority) goes first, and an idle host
# still rewrites at full speed (issue 10: the load keeps its IOPS; docs/PERFORMANCE.md).
ONLINE_NICE = 19
LABEL = {"encrypt": "encrypt", "decrypt": "decrypt", "rekey": "deep rekey"}


def control_socket_path(datastore: str, base: str | None = None) -> str:
    """The control socket of the mount of `datastore`, in the runtime directory of the user who mounted it."""
    digest = hashlib.sha256(os.path.realpath(datastore).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(base or runtime_dir(), f"mount-{digest}.ctl")


class OnlineOp:
    """One operation on one folder, in its own thread of the mount process."""

    def __init__(self, server: "ControlServer", folder_path: str, rel: str, op: str, provider: str | None,
                 rate: int | None, resumed: bool = False, abort: bool = False) -> None:
        self.server = server
        self.core = server.core
        self.path = folder_path  # at rest, for messages
        self.rel = rel  # in the mount
        self.op = op  # "encrypt", "decrypt" or "rekey" (deep)
        self.provider = provider
        self.rate = rate  # bytes per second, None: as fast as it goes
        self.resumed = resumed  # found interrupted at rest when the mount started (ControlServer.live)
        self.state = "starting"
        self.error: str | None = None
        self.file: str | None = None
        self.done_bytes = 0
        self.total_bytes = 0
        self.started = time.monotonic()
        self.ended: float | None = None
        self._go = threading.Event()  # cleared while paused
        self._go.set()
        self._stop = threading.Event()
        self._abort = threading.Event()  # `vmfs-crypt abort`: back to the old keys (set from the start: abort one at rest)
        if abort:
            self._abort.set()
        self._abort_only = abort  # started to abort the operation recorded at rest, not to run one
        self.aborting = False  # the state at rest is the abort's
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"online {op} {rel}")

    # -- control ---------------------------------------------------------------------------
    def pause(self) -> None:
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    def abort(self) -> None:
        """Return to the old keys: the forward run stops after its region in flight and the boundaries go back."""
        self._abort.set()
        self._go.set()

    def _forward_stopped(self, state) -> bool:
        return self._stop.is_set() or (self._abort.is_set() and not state.aborting)

    def stop(self) -> None:
        """The mount is ending: stop after the region in flight (the next mount resumes)."""
        self._stop.set()
        self._go.set()

    def status(self) -> dict:
        now = self.ended or time.monotonic()
        elapsed = max(now - self.started, 1e-6)
        speed = self.done_bytes / elapsed
        left = max(self.total_bytes - self.done_bytes, 0)
        shown = "paused" if self.state in ("starting", "running") and not self._go.is_set() else self.state
        if shown == "running" and self.aborting:
            shown = "aborting"  # going back: done_bytes and total_bytes count the abort's bytes
        return {"folder": self.path, "path": self.rel, "op": self.op, "state": shown, "file": self.file,
                "aborting": self._abort.is_set(),
                "done_bytes": self.done_bytes, "total_bytes": self.total_bytes,
                "percent": round(100.0 * self.done_bytes / self.total_bytes, 1) if self.total_bytes else 100.0,
                "bytes_per_s": round(speed), "eta_s": round(left / speed, 1) if speed > 0 and left else 0.0,
                "rate": self.rate, "error": self.error, "resumed": self.resumed}

    # -- the operation ---------------------------------------------------------------------
    def _run(self) -> None:
        _yield_cpu()
        try:
            self.state = "running"
            self._carry_out()
            if self.state == "running":
                self.state = "aborted" if self.aborting else "done"
                log.info("%s: online %s %s", self.path, LABEL[self.op],
                         "aborted: the folder is under its old keys" if self.aborting else "finished")
        except (VmfsCryptError, OSError) as exc:
            self.state = "failed"
            self.error = str(exc) if isinstance(exc, VmfsCryptError) else f"{exc.strerror or exc}"
            log.error("%s: online %s stopped: %s; run the command again (or mount again) to resume it",
                      self.path, LABEL[self.op], self.error)
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the mount; it is logged, the op stops
            self.state = "failed"
            self.error = f"internal error: {exc!r}"
            log.exception("%s: online %s stopped by an internal error", self.path, LABEL[self.op])
        finally:
            self.ended = time.monotonic()
            self.server.ended(self)

    def _carry_out(self) -> None:
        core = self.core
        dfd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        held: dict[str, held_files.HeldFile] = {}
        committed = False
        try:
            st = os.fstat(dfd)
            inode = (st.st_dev, st.st_ino)
            # Through the descriptor: a rename of the folder or of a parent does not lose it.
            folder = VmFolder(f"/proc/self/fd/{dfd}", self.path)
            folder.allow_reencrypt = True
            mark = held_files.OnlineFolder(LABEL[self.op])
            with core._meta_lock:
                if inode in core.online:
                    raise InUseError(f"{self.path}: an online {core.online[inode].op} runs already")
                core.online[inode] = mark  # from here, names in the folder do not change
            try:
                purpose = ("rekey" if self.op == "rekey" else "decrypt") if self._abort.is_set() else self.op
                keys = AgentClient(self.server.agent_socket, purpose=purpose)
                with FolderTransaction(folder, f"online {LABEL[self.op]}") as tx:
                    plan = self._plan(tx, folder, keys, mark)
                    if plan is None:
                        return
                    current, start_args, fresh = plan
                    with core._meta_lock:
                        for f in (current.reencrypt.files if current is not None else start_args[2]):
                            held[f.name] = self._hold(folder, f, keys, fresh)
                    fresh.clear()
                    if current is None:  # recorded at rest only now: every file is served under its split
                        kek, base, entries, strip = start_args
                        with self._descriptor_locks(strip), mark.gate:
                            current = reencrypt.start(tx, self.op, kek, base, entries, strip,
                                                      reencrypt.region_size(ONLINE_REGION_SIZE))
                    state = current.reencrypt
                    if not state.aborting and not self._abort.is_set():
                        self._rewrite(folder, current, held)  # forward, until done, stopped or aborted
                    if self._abort.is_set() and not state.aborting and not self._stop.is_set():
                        self._begin_abort(folder, current, held)  # the state at rest becomes the abort's
                    if state.aborting and not self._stop.is_set():
                        self._rewrite(folder, current, held)  # back to boundary 0, file by file
                    if self._stop.is_set():
                        return
                    with self._descriptor_locks(), mark.gate:
                        remove_region(folder.backing_dir)
                        if state.aborting:
                            reencrypt.commit_abort(tx, current, check=False)
                        else:
                            reencrypt.commit_online(tx, current)
                    committed = True
                    with core._meta_lock:
                        for h in held.values():
                            held_files.finish(core, h, current.kek if state.aborting else state.kek,
                                              back=state.aborting)
                    held.clear()
            finally:
                with core._meta_lock:
                    for h in held.values():
                        held_files.release(core, h)
                    core.online.pop(inode, None)
        finally:
            os.close(dfd)
            if not committed and self.state == "running" and self._stop.is_set():
                self.state = "stopped"

    def _plan(self, tx: FolderTransaction, folder: VmFolder, keys, mark):
        """None when nothing is to be rewritten; else (current, None, {}) to resume the operation recorded at rest,
        or (None, (kek, base, entries, strip), new DEKs by name) for a new one."""
        if folder.encrypted:
            current = folder.load_keys(allow_reencrypt=True)
            if current.reencrypt is not None and self._abort.is_set():
                log.info("%s: aborting the in-place %s online", self.path, LABEL[current.reencrypt.op])
                self.op = current.reencrypt.op
                return current, None, {}
            if current.reencrypt is not None and current.reencrypt.aborting:
                raise UsageError(f"{self.path}: the abort of an in-place {LABEL[current.reencrypt.op]} is in "
                                 f"flight; finish it first with 'vmfs-crypt abort {self.path}'")
            if current.reencrypt is not None:
                if current.reencrypt.op != self.op:
                    raise UsageError(f"{self.path}: an interrupted in-place {LABEL[current.reencrypt.op]} is in "
                                     f"flight; finish it first with 'vmfs-crypt "
                                     f"{'rekey --deep' if current.reencrypt.op == 'rekey' else current.reencrypt.op} "
                                     f"{self.path}'")
                log.info("%s: resuming the in-place %s online", self.path, LABEL[self.op])
                if self.op == "encrypt":
                    keys.purpose = "decrypt"  # the part done is existing data (as ops/reencrypt.resume)
                return current, None, {}
        if self._abort.is_set():
            if self._abort_only:  # `vmfs-crypt abort` of an operation at rest that is gone meanwhile
                raise UsageError(f"{self.path}: no encrypt, decrypt or deep rekey is in flight there; nothing to abort")
            self.aborting = True  # aborted while starting: nothing was recorded or rewritten yet
            return None
        infos = folder_files(folder)
        if self.op == "encrypt":
            if folder.encrypted:
                raise UsageError(f"{self.path} is encrypted already")
            todo = lifecycle.encrypt_todo(folder, infos)
            folder_keys = FolderKeys(keys.new_kek(self.provider, os.path.basename(self.path)))
            if not todo:
                with self._descriptor_locks(), mark.gate:
                    tx.commit(folder_keys)
                return None
            entries, fresh = lifecycle.encrypt_entries(tx, keys, folder_keys, todo, by_descriptor=False)
            base, strip, kek = folder_keys, [], folder_keys.kek
        else:
            if not folder.encrypted:
                raise UsageError(f"{self.path} is not encrypted")
            lifecycle.check_keys(folder, infos)
            base = folder.load_keys()
            if self.op == "decrypt":
                entries, strip = lifecycle.decrypt_entries(folder, infos)
                fresh, kek = {}, None
            else:
                kek = keys.new_kek(self.provider or base.kek.provider_id, os.path.basename(self.path))
                entries, strip, fresh = lifecycle.deep_rekey_entries(tx, keys, base, kek, infos, by_descriptor=False)
        if not entries:
            with self._descriptor_locks(strip), mark.gate:
                reencrypt.start(tx, self.op, kek, base, entries, strip)
            return None
        return None, (kek, base, entries, strip), fresh

    def _descriptor_locks(self, stripped: list[str] | None = None):
        """Hold the open descriptor views of the folder (their write-back re-reads the key lines at rest)."""
        core, rel = self.core, self.rel
        stripped = set(stripped or [])

        class Held:
            def __enter__(inner):
                with core._meta_lock:
                    inner.descs = sorted((d for r, d in core.files.descriptors.items()
                                          if os.path.dirname(r) == rel), key=lambda d: d.rel)
                for d in inner.descs:
                    d.lock.acquire()
                return inner

            def __exit__(inner, *exc):
                for d in reversed(inner.descs):
                    if os.path.basename(d.rel) in stripped and exc[0] is None:
                        d.key_lines, d.key_lines_seen = [], []
                    d.lock.release()

        return Held()

    def _hold(self, folder: VmFolder, f, keys, fresh: dict) -> held_files.HeldFile:
        path = os.path.join(folder.backing_dir, f.name)
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{os.path.join(self.path, f.name)}: not a regular file")
        what = os.path.join(self.path, f.name)
        frm = SectorCipher(keys.unwrap(f.frm, what)) if f.frm is not None else None
        if f.to is None:
            to = None
        elif f.name in fresh:
            to = SectorCipher(fresh.pop(f.name))
        else:
            to = SectorCipher(keys.unwrap(f.to, what))
        h = held_files.hold(self.core, (st.st_dev, st.st_ino), os.path.join(self.rel, f.name), frm, to, LABEL[self.op])
        if f.boundary:  # resumed: the part below the boundary is under the new key already
            h.shared.lock.acquire_write()
            try:
                h.set_boundary(self.core, None if f.done else f.boundary // SECTOR_SIZE)
            finally:
                h.shared.lock.release_write()
        return h

    def _begin_abort(self, folder: VmFolder, current: FolderKeys, held: dict) -> None:
        """The state at rest becomes the abort's (FORMAT.md 7.8), with the file in flight held."""
        state = current.reencrypt
        f = state.current()
        lock = held[f.name].shared.lock if f is not None else None
        if lock is not None:
            lock.acquire_write()
        try:
            reencrypt.begin_abort(VmFolder(folder.backing_dir, self.path), current)
        finally:
            if lock is not None:
                lock.release_write()
        self.aborting = True
        log.info("%s: the online %s goes back to the old keys (abort)", self.path, LABEL[self.op])

    def _rewrite(self, folder: VmFolder, current: FolderKeys, held: dict) -> None:
        """Every region of every file (in reverse when aborting), each with its file's write lock held."""
        state = current.reencrypt
        self.aborting = state.aborting
        d = folder.backing_dir
        if state.aborting:  # progress from here counts the way back
            order, left = list(reversed(state.files)), sum(f.boundary for f in state.files)
            self.done_bytes = 0
        else:
            order, left = state.files, sum(max(f.size - f.boundary, 0) for f in state.files)
        self.total_bytes = self.done_bytes + left
        for f in order:
            h = held[f.name]
            what = os.path.join(self.path, f.name)
            self.file = f.name
            fd = reencrypt.open_rw(os.path.join(d, f.name))
            try:
                lock = h.shared.lock
                lock.acquire_write()
                try:  # a crash inside this region: its old bytes back first
                    reencrypt.restore_saved(fd, d, state, f, what)
                finally:
                    lock.release_write()
                while not self._forward_stopped(state):
                    self._go.wait()
                    if self._forward_stopped(state):
                        break
                    began = time.monotonic()
                    lock.acquire_write()
                    try:
                        span = self._zone(fd, f, lock, what, state)
                    finally:
                        lock.release_write()
                    if span is None:
                        break
                    done = False
                    try:
                        self._region(fd, d, current, f, h, what, *span)
                        done = True
                    finally:
                        lock.acquire_write()
                        try:
                            if done:  # going back, a file is never "finished": B sectors under the new key
                                h.set_boundary(self.core, None if f.done and not state.aborting
                                               else f.boundary // SECTOR_SIZE)
                            lock.clear_hot()
                        finally:
                            lock.release_write()
                    reencrypt.after_region()
                    self.done_bytes += span[1]
                    if self.rate:
                        self._stop.wait(max(0.0, span[1] / self.rate - (time.monotonic() - began)))
            finally:
                os.close(fd)
            if self._forward_stopped(state):
                return

    def _zone(self, fd: int, f, lock, what: str, state) -> tuple[int, int] | None:
        """The next region (at the boundary, or below it when aborting), made the file's hot zone; None at the end.

        The caller holds the write lock. Only guest I/O that touches the region waits while it
        is rewritten; the rest of the file is served meanwhile (as dm-crypt's online reencrypt
        holds I/O to its hotzone only). A region that ends at the file's end has a zone that
        runs past it: a write that grows the file touches the short tail sector, which the
        rewrite may hold.
        """
        reencrypt.sized(fd, f, state, what)  # a guest's writes past the end are rewritten too
        if (f.boundary == 0) if state.aborting else f.done:
            return None
        off, n = state.region_of(f)
        lock.set_hot(off, off + n if off + n < f.size else HOT_TO_END)
        return off, n

    def _region(self, fd: int, d: str, current: FolderKeys, f, h, what: str, off: int, n: int) -> None:
        """Rewrite the hot zone's region (no guest I/O touches it now) and move the boundary at rest."""
        state = current.reencrypt

        def lost(off: int, n: int, exc: Exception) -> None:
            log.error("%s: could not put back bytes %d-%d after a failed rewrite (%s); its reads are refused "
                      "until the next mount resumes the operation from the region saved in the folder",
                      what, off, off + n, exc)
            self.core.datapath.set_revoked(h.shared.lock, True)
            h.shared.record = None

        reencrypt.rewrite_region(fd, d, state, f, h.frm, h.to, what, lost=lost)
        reencrypt.advance(f, state, off, n)
        VmFolder(d, self.path).save_keys(current)  # the boundary moves at rest: the region is under its new key


def _yield_cpu() -> None:
    """Lower the calling thread's priority to ONLINE_NICE (Linux: a thread's nice is its own; never raised)."""
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < ONLINE_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, ONLINE_NICE)
    except OSError as exc:  # a sandbox without setpriority: the operation runs at the mount's priority
        log.warning("online operation runs at the mount's priority: setpriority failed (%s)", exc.strerror)


class ControlServer:
    """The mount's control socket: one JSON request per connection, from our own uid or root only (SO_PEERCRED)."""

    def __init__(self, core, datastore: str, agent_socket: str) -> None:
        self.core = core
        self.datastore = os.path.realpath(datastore)
        self.agent_socket = agent_socket
        self.path = control_socket_path(datastore, ensure_runtime_dir())
        self.ops: dict[str, OnlineOp] = {}  # by folder path at rest
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._resumes: list[OnlineOp] = []  # started by live(), once the mount serves
        self._ready = None

    def start(self) -> "ControlServer":
        if os.path.lexists(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)  # a socket a killed mount left behind, in our private directory
            else:
                raise InUseError(f"{self.path}: another mount of {self.datastore} answers there")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        sock.listen(8)
        self._sock = sock
        self._queue_resumes()
        threading.Thread(target=self._serve, daemon=True, name="control").start()
        return self

    def _queue_resumes(self) -> None:
        """Every folder a crash left mid-way (FORMAT.md 7.8), listed in the status from the start (the CLI's
        `mount` names them once the mount is live); each is carried out online like a new request."""
        for path, op, aborting in lifecycle.interrupted_folders(self.datastore):
            real = os.path.realpath(path)
            # An abort in flight goes on back to the old keys, never forward (FORMAT.md 7.8, "Aborting").
            resume = OnlineOp(self, real, os.path.relpath(real, self.datastore), op, None, None, resumed=True,
                              abort=aborting)
            self.ops[real] = resume
            self._resumes.append(resume)
            log.info("%s: an interrupted %s is resumed online once the mount is live", real,
                     f"abort of an in-place {LABEL[op]}" if aborting else f"in-place {LABEL[op]}")

    def live(self, ready) -> None:
        """The mount serves and has said so (READY=1, or its readiness pipe): start the resumes now, so that
        however long they take they never delay the mount's readiness (systemd's start time-out)."""
        with self._lock:
            self._ready = ready
            resumes = list(self._resumes)
        if resumes:
            ready.update_status(f"resuming the interrupted in-place {', '.join(LABEL[r.op] for r in resumes)} of "
                                f"{', '.join(r.path for r in resumes)}")
        for r in resumes:
            r.thread.start()

    def ended(self, op: OnlineOp) -> None:
        """An operation's thread ends: once every resume has, systemd's STATUS says how they went."""
        with self._lock:
            if not op.resumed or self._ready is None or any(r.ended is None for r in self._resumes):
                return
            failed = [r for r in self._resumes if r.state == "failed"]
            ready = self._ready
        ready.update_status(f"{len(failed)} interrupted operation(s) not resumed: {', '.join(r.path for r in failed)} "
                            "(see the log)" if failed else None)

    def stop(self) -> None:
        with self._lock:
            ops = list(self.ops.values())
        for op in ops:
            op.stop()
        for op in ops:
            if op.thread.ident is not None:  # a resume the mount never got to start has no thread to wait for
                op.thread.join(timeout=60)
        if self._sock is not None:
            self._sock.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True, name="control-request").start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                peer = peer_credentials(conn)
                if peer.uid not in (os.geteuid(), 0):
                    log.warning("control request from pid %d of uid %d refused (not the mount's user or root)",
                                peer.pid, peer.uid)
                    reply = {"ok": False, "error": "permission denied: only the user who mounted it or root"}
                else:
                    rfile = conn.makefile("rb")
                    line = rfile.readline(MAX_REQUEST + 1)
                    reply = self.handle(json.loads(line)) if len(line) <= MAX_REQUEST else \
                        {"ok": False, "error": "request too long"}
            except (VmfsCryptError, OSError, ValueError) as exc:
                reply = {"ok": False, "error": str(exc)}
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass

    def handle(self, req) -> dict:
        if not isinstance(req, dict):
            raise ValueError("a request is a JSON object")
        cmd = req.get("cmd")
        if cmd == "status":
            with self._lock:
                return {"ok": True, "ops": [op.status() for op in self.ops.values()]}
        if cmd == "start":
            return self._start(req)
        if cmd == "abort":
            return self._abort(req)
        if cmd in ("pause", "resume", "rate"):
            op = self.ops.get(self._folder(req.get("folder"))[0])
            if op is None or op.state not in ("running", "starting"):  # (a paused one is running)
                last = "" if op is None else f" (the last one, an online {LABEL[op.op]}, is {op.state}" + \
                    (f": {op.error})" if op.error else ")")
                return {"ok": False, "error": f"{req.get('folder')}: no online operation runs there{last}"}
            if cmd == "pause":
                op.pause()
            elif cmd == "resume":
                op.resume()
            else:
                op.rate = _rate(req.get("rate"))
            return {"ok": True, "op": op.status()}
        raise ValueError(f"unknown request {cmd!r}")

    def _folder(self, path) -> tuple[str, str]:
        """(folder at rest, folder in the mount) for a folder path the CLI resolved; only folders of this datastore."""
        if not isinstance(path, str) or not path:
            raise ValueError("a folder path is needed")
        real = os.path.realpath(path)
        if not real.startswith(self.datastore + "/") or not os.path.isdir(real):
            raise UsageError(f"{path}: not a VM folder of the mounted datastore {self.datastore}")
        return real, os.path.relpath(real, self.datastore)

    def _start(self, req: dict) -> dict:
        op_name = req.get("op")
        if op_name not in ("encrypt", "decrypt", "rekey"):
            raise ValueError(f"unknown operation {op_name!r}")
        real, rel = self._folder(req.get("folder"))
        provider = req.get("provider")
        if provider is not None and not isinstance(provider, str):
            raise ValueError("provider must be a string")
        with self._lock:
            running = self.ops.get(real)
            if running is not None and running.state in ("starting", "running"):
                return {"ok": False, "error": f"{real}: an online {LABEL[running.op]} runs there already"}
            op = self.ops[real] = OnlineOp(self, real, rel, op_name, provider, _rate(req.get("rate")))
        op.thread.start()
        return {"ok": True, "op": op.status()}

    def _abort(self, req: dict) -> dict:
        """`vmfs-crypt abort`: the running (or paused) operation of the folder goes back, or one recorded at rest does."""
        real, rel = self._folder(req.get("folder"))
        with self._lock:
            running = self.ops.get(real)
            if running is not None and running.state in ("starting", "running"):
                running.abort()
                return {"ok": True, "op": running.status()}
            state = _in_flight(real)
            if state is None:
                return {"ok": False, "code": "usage",
                        "error": f"{real}: no encrypt, decrypt or deep rekey is in flight there; nothing to abort"}
            op = self.ops[real] = OnlineOp(self, real, rel, state.op, None, _rate(req.get("rate")), abort=True)
        op.thread.start()
        return {"ok": True, "op": op.status()}


def _in_flight(folder_path: str):
    """The in-place operation recorded in the folder's key file at rest, or None (FORMAT.md 7.8)."""
    folder = VmFolder(folder_path)
    if not folder.encrypted:
        return None
    return folder.load_keys(allow_reencrypt=True).reencrypt


def _rate(value) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value <= 0:
        raise ValueError("rate must be a positive number of bytes per second")
    return value


# -- the CLI's side ------------------------------------------------------------------------------

def mounted_datastore(folder_path: str) -> str | None:
    """The datastore of a running vmfs-crypt mount that holds `folder_path` (at rest), if any."""
    real = os.path.realpath(folder_path)
    for m in vmfs_mounts():
        if real.startswith(m.datastore.rstrip("/") + "/"):
            return m.datastore
    return None


def request(datastore: str, req: dict, timeout_s: float = 30.0) -> dict | None:
    """Send one request to the mount of `datastore`; None when no mount of ours answers there."""
    path = control_socket_path(datastore)
    if not os.path.exists(path):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(path)
        except OSError:
            return None
        peer = peer_credentials(sock)
        if peer.uid not in (os.geteuid(), 0):
            raise InUseError(f"{path} is served by uid {peer.uid}, not by you or root: refusing to use it")
        # Fail closed: the socket must be served by the process that holds the datastore's mount lock.
        holder = lock_info(datastore).get("pid")
        if not isinstance(holder, int) or holder != peer.pid:
            raise InUseError(f"{datastore} is mounted by a process you cannot identify (its mount lock names "
                             f"{'pid ' + str(holder) if isinstance(holder, int) else 'no process'}, the control "
                             f"socket is served by pid {peer.pid}): unmount it and mount it again")
        sock.sendall(json.dumps(req).encode() + b"\n")
        line = sock.makefile("rb").readline(1 << 20)
    finally:
        sock.close()
    if not line:
        raise InUseError(f"the mount of {datastore} closed its control socket without an answer")
    return json.loads(line)
