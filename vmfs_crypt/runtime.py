"""The private runtime directory for agent sockets, mount logs and pid files, which nobody else may have made.

Issue 7, case 3: another local user pre-created /tmp/vmfs-crypt-UID and ran a fake agent in
it. The directory is $XDG_RUNTIME_DIR/vmfs-crypt, else /run/user/UID/vmfs-crypt, else (root)
/run/vmfs-crypt, else /tmp/vmfs-crypt-UID; whichever it is, it must be a real directory (not
a symlink) owned by us with mode 0700, or it is refused with the reason. Clients also check
the agent's peer credentials before they send anything (agent/client.py).
"""

import os
import stat

from .errors import ConfigError


def runtime_dir() -> str:
    uid = os.geteuid()
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "vmfs-crypt")
    user_run = f"/run/user/{uid}"
    if os.path.isdir(user_run):
        return os.path.join(user_run, "vmfs-crypt")
    if uid == 0 and os.path.isdir("/run"):
        return "/run/vmfs-crypt"
    return f"/tmp/vmfs-crypt-{uid}"


def check_private_dir(path: str) -> None:
    """Raise ConfigError unless `path` is a directory (not a symlink) owned by us, mode 0700 or tighter."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a directory (a symlink or a file is there); it may be an attack: "
                          "remove it, or set XDG_RUNTIME_DIR to a private directory")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{path} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}): another user "
                          "may have made it to catch your keys; remove it (as root) or set XDG_RUNTIME_DIR")
    if st.st_mode & 0o077:
        raise ConfigError(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; a runtime directory must be 0700 "
                          f"(run 'chmod 700 {path}')")


def ensure_runtime_dir(path: str | None = None) -> str:
    """Create the runtime directory if it is missing (0700), then check it; return its path."""
    path = path or runtime_dir()
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        os.mkdir(path, 0o700)
    check_private_dir(path)
    return path
