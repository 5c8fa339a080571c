"""Who may do which key operation (issue 11): principals from kernel credentials, privileges from [roles].

The agent decides every request from its peer's credentials as the kernel reports them
(SO_PEERCRED uid, gid and pid, SO_PEERGROUPS supplementary groups), never from what the
client says about itself. What the client does say is the *purpose* of a key request
(`vmfs-crypt cat` unwraps for "cat", the mount for "mount"): (operation, purpose) selects the
privilege that is checked, and every combination that is not listed here is refused, so a
purpose cannot be used to get an operation that another purpose would not allow. Every
purpose that hands out a DEK (unwrap for mount, cat, decrypt or rekey) gives its holder the
plaintext of that file: those privileges are all "can read data"; the others (encrypt,
unlock, manage-providers, policy, operate-mounts) never return a DEK that protects existing data.

Without a [roles] table (a single-user host) the agent's own uid and root may do everything
and nobody else may connect: the behaviour before roles existed.
"""

import grp
import os
import pwd
import socket
from dataclasses import dataclass

from ..config import PRIVILEGES, Config
from ..errors import AgentError, PermissionDeniedError
from ..sysutil import peer_credentials, peer_groups
from . import protocol as p

# Purposes a client may state for a key request, and the privilege each needs for each operation.
PURPOSES = ("mount", "cat", "create", "encrypt", "decrypt", "rekey")
KEY_OPS: dict[tuple[str, str], str] = {
    (p.OP_UNWRAP, "mount"): "mount",
    (p.OP_UNWRAP, "cat"): "cat",
    (p.OP_UNWRAP, "decrypt"): "decrypt",
    (p.OP_UNWRAP, "rekey"): "rekey",  # deep rekey reads the data under the old DEKs
    (p.OP_NEW_FILE_KEY, "mount"): "mount",  # a file created through the mount
    (p.OP_NEW_FILE_KEY, "create"): "encrypt",
    (p.OP_NEW_FILE_KEY, "encrypt"): "encrypt",
    (p.OP_NEW_FILE_KEY, "rekey"): "rekey",
    (p.OP_NEW_KEK, "mount"): "encrypt",  # a folder made through a mount whose datastore policy encrypts it (issue 9)
    (p.OP_NEW_KEK, "create"): "encrypt",
    (p.OP_NEW_KEK, "encrypt"): "encrypt",
    (p.OP_NEW_KEK, "rekey"): "rekey",
    (p.OP_REWRAP, "rekey"): "rekey",
}
# The privilege a command of each purpose asks for before it starts (AgentClient.authorize).
PURPOSE_PRIVILEGE = {"mount": "mount", "cat": "cat", "create": "encrypt", "encrypt": "encrypt", "decrypt": "decrypt",
                     "rekey": "rekey"}
# Operations that are not key requests, and the privilege each needs.
OP_PRIVILEGE: dict[str, str] = {
    p.OP_PREFETCH: "mount",
    p.OP_HOLD: "mount",  # only mounts keep an agent in use
    p.OP_UNLOCK: "unlock",
    p.OP_RELOAD: "manage-providers",
    p.OP_PROVIDER_ADD: "manage-providers",
    p.OP_PROVIDER_REMOVE: "manage-providers",
    p.OP_PROVIDER_BACKUP: "manage-providers",
    p.OP_PROVIDER_RESTORE: "manage-providers",
    p.OP_SET_POLICY: "policy",
    p.OP_MOUNT_START: "operate-mounts",
    p.OP_MOUNT_STOP: "operate-mounts",
}
OPEN_OPS = {p.OP_PING, p.OP_WHOAMI, p.OP_AUTHORIZE}  # authorize checks the privilege it names itself
MEMBER_OPS = {p.OP_STATUS, p.OP_LOCKED}  # anyone the roles name (no keys in the answers)
OWNER_OPS = {p.OP_STOP}  # stopping the agent stops every mount's new opens: its owner's decision
OWNER = "owner"  # what the audit log names as the privilege of the agent's own user and root

_OP_TEXT = {p.OP_UNWRAP: "unwrap a file's key", p.OP_NEW_FILE_KEY: "make a new file key",
            p.OP_NEW_KEK: "create a new KEK", p.OP_REWRAP: "rewrap a file's key"}


def _cmdline(pid: int, uid: int) -> str:
    """The peer's command line, for the audit log only; "?" if the pid no longer runs as that uid."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:
            uids = next((line.split()[1:] for line in f if line.startswith("Uid:")), [])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return "?"
    if str(uid) not in uids[:2]:  # the peer exited and its pid was reused by another user's process
        return "?"
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")[:1000]


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


@dataclass(frozen=True)
class Principal:
    """Who sent a request, as the kernel says; `owner` is the agent's own uid or root (every privilege)."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    pid: int
    user: str
    cmdline: str
    owner: bool

    @classmethod
    def of_peer(cls, sock: socket.socket) -> "Principal":
        cred = peer_credentials(sock)
        groups = tuple(sorted(set(peer_groups(sock)) | {cred.gid}))
        return cls(cred.uid, cred.gid, groups, cred.pid, user_name(cred.uid), _cmdline(cred.pid, cred.uid),
                   cred.uid in (os.geteuid(), 0))

    @classmethod
    def agent_itself(cls) -> "Principal":
        """The agent acting on its own (the periodic retry of locked keys)."""
        uid = os.geteuid()
        return cls(uid, os.getegid(), tuple(sorted(set(os.getgroups()) | {os.getegid()})), os.getpid(),
                   user_name(uid), "vmfs-crypt agent (periodic key retry)", True)

    def describe(self) -> str:
        return f"{self.user} (uid {self.uid}, pid {self.pid})"

    def audit_fields(self) -> dict:
        return {"uid": self.uid, "user": self.user, "gid": self.gid, "groups": list(self.groups), "pid": self.pid,
                "cmdline": self.cmdline}


def _gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


class Access:
    """The decisions of one configuration's roles."""

    def __init__(self, config: Config) -> None:
        self.config = config

    @property
    def multi_user(self) -> bool:
        """Roles are configured: other users may connect, each request is decided by their privileges."""
        return bool(self.config.roles)

    def roles_of(self, who: Principal) -> list[str]:
        gids = set(who.groups)
        out = []
        for name, role in sorted(self.config.roles.items()):
            if who.user in role.get("users", ()) or any(_gid(g) in gids for g in role.get("groups", ())):
                out.append(name)
        return out

    def privileges(self, who: Principal) -> frozenset[str]:
        if who.owner:
            return frozenset(PRIVILEGES)
        out: set[str] = set()
        for name in self.roles_of(who):
            out |= self.config.role_privileges(name)
        return frozenset(out)

    def _refuse(self, who: Principal, privilege: str, action: str) -> PermissionDeniedError:
        return PermissionDeniedError(
            f"{who.describe()} lacks the privilege '{privilege}' needed to {action}; "
            f"the roles in {self.config.path} decide who holds it (vmfs-crypt status shows yours)")

    def required(self, req: dict) -> tuple[str, str]:
        """(privilege, what it allows) for a request, or raise for a request no principal may make."""
        op, purpose = req.get("op"), req.get("purpose")
        if not isinstance(op, str) or not isinstance(purpose, (str, type(None))):
            raise PermissionDeniedError(f"malformed request (op {op!r}, purpose {purpose!r}); refused")
        if (op, purpose) in KEY_OPS:
            purpose = req["purpose"]
            return KEY_OPS[(op, purpose)], f"{_OP_TEXT[op]} for {purpose}"
        if op in _OP_TEXT:
            purpose = req.get("purpose")
            raise PermissionDeniedError(
                f"{op} for purpose {purpose!r} is not an operation of vmfs-crypt (purposes: "
                f"{', '.join(sorted({pu for o, pu in KEY_OPS if o == op}))}); refused")
        if op in OP_PRIVILEGE:
            return OP_PRIVILEGE[op], str(op).replace("_", " ")
        if op == p.OP_AUTHORIZE:
            priv = req.get("privilege")
            if not isinstance(priv, str) or priv not in PRIVILEGES:
                raise AgentError(f"authorize: unknown privilege {priv!r} (known: {', '.join(PRIVILEGES)})")
            return str(priv), str(req.get("action") or PRIVILEGES[priv])
        raise AgentError(f"unknown request {op!r}")

    def check(self, who: Principal, req: dict) -> str | None:
        """The privilege that allows `req` (None for the open requests), or raise PermissionDeniedError."""
        op = req.get("op")
        if not isinstance(op, str):
            raise AgentError(f"malformed request: op {op!r} is not a name")
        if op in OPEN_OPS - {p.OP_AUTHORIZE}:
            return None
        if op in MEMBER_OPS:
            if who.owner or self.roles_of(who):
                return None
            raise PermissionDeniedError(f"{who.describe()} holds no role in {self.config.path}; "
                                        "ask the administrator for one")
        if op in OWNER_OPS:
            if who.owner:
                return OWNER
            raise PermissionDeniedError(f"{who.describe()} may not {op} the agent: only its own user "
                                        f"(uid {os.geteuid()}) or root may")
        privilege, action = self.required(req)
        if privilege not in self.privileges(who):
            raise self._refuse(who, privilege, action)
        return privilege
