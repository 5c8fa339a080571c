"""Starting agents: the shared agent of a configuration (mounts, `agent start`) and a command's private sidecar.

A CLI command that needs keys while no agent runs gets a private agent on its own socket,
which exits with the command (it holds the command's pid): concurrent commands never race
for one socket and never leave an agent behind (issue 7, case 13). The shared agent is
started under an flock, so two mounts starting at once start one agent.
"""

import contextlib
import fcntl
import os
import sys

from ..config import Config
from ..errors import AgentError
from ..procs import raise_for, spawn_detached
from ..runtime import ensure_runtime_dir
from .authz import PURPOSE_PRIVILEGE
from .client import AgentClient

START_TIMEOUT_S = 20.0


def _log_path(sock: str) -> str:
    return (sock[:-len(".sock")] if sock.endswith(".sock") else sock) + ".log"


def agent_socket(config: Config) -> str:
    """The configuration's agent socket, after checking (or creating) the private runtime directory it lies in.

    Checked before anything connects there: a directory another user made, or a looser one,
    is refused with the reason (issue 7, case 3).
    """
    if not config.agent.socket:
        ensure_runtime_dir()
    return config.agent_socket


def spawn_agent(config: Config, sock: str, sidecar: bool, hold_pid: int | None = None) -> int:
    """Start a detached agent listening on `sock`; return its pid once it listens."""
    if not config.agent.socket:
        ensure_runtime_dir(os.path.dirname(sock))
    cmd = [sys.executable, "-m", "vmfs_crypt.agent", "--config", config.path, "--socket", sock]
    if sidecar:
        cmd.append("--sidecar")
    if hold_pid:
        cmd += ["--hold-pid", str(hold_pid)]
    log_path = _log_path(sock)
    proc, line = spawn_detached(cmd, log_path, START_TIMEOUT_S)
    if line == "ok":
        return proc.pid
    if not line:
        proc.kill()
        proc.wait()
        raise AgentError(f"the key agent did not start within {START_TIMEOUT_S:.0f} s; see {log_path}")
    proc.wait(timeout=10)
    raise_for(line, AgentError, f"the key agent failed to start; see {log_path}")


@contextlib.contextmanager
def _start_lock(config: Config):
    lock_path = agent_socket(config) + ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def shared_agent(config: Config, sidecar: bool) -> tuple[str, bool]:
    """(socket, started): the configuration's agent, started now (as a sidecar if asked) when none answers."""
    sock = agent_socket(config)
    if AgentClient(sock).alive():
        return sock, False
    with _start_lock(config):
        if AgentClient(sock).alive():
            return sock, False
        if os.path.lexists(sock):
            os.unlink(sock)  # a dead agent's socket (no agent answered it under the lock)
        spawn_agent(config, sock, sidecar=sidecar)
    return sock, True


@contextlib.contextmanager
def agent_session(config: Config, purpose: str | None = None, privilege: str | None = None,
                  action: str | None = None, target: str | None = None):
    """A client of the running agent, or of a private sidecar that lives as long as this command.

    Its key requests state `purpose`; before anything else the agent is asked whether we hold
    `privilege` (the purpose's, by default), so a refused command stops before it touches a
    file, with one line naming the privilege, and the attempt is in the audit log (issue 11).
    """
    privilege = privilege or PURPOSE_PRIVILEGE.get(purpose or "")
    action = action or (f"{purpose} {target}" if purpose and target else purpose)
    client = AgentClient(agent_socket(config), purpose=purpose)
    if client.alive():
        try:
            if privilege:
                client.authorize(privilege, action or privilege, target)
            yield client
        finally:
            client.close()
        return
    sock = os.path.join(ensure_runtime_dir(), f"cmd-{os.getpid()}.sock")
    spawn_agent(config, sock, sidecar=True, hold_pid=os.getpid())
    private = AgentClient(sock, purpose=purpose)
    try:
        if privilege:
            private.authorize(privilege, action or privilege, target)
        yield private
    finally:
        private.stop(force=True)
