"""Agent commands: agent start|stop|status|reload, and status / unlock of locked disks."""

import time

import click

from ..agent import protocol as p
from ..agent.client import AgentClient
from ..agent.launcher import agent_socket, spawn_agent
from ..errors import AgentError, ExitCode
from .online import all_operations, echo_operations
from .common import Group, emit_json, note, pass_ctx, running_agent, warn


@click.group(cls=Group)
def agent():
    """Run the key agent by hand (mount starts a sidecar when none runs)."""


@agent.command("start")
@click.option("--foreground", "-f", is_flag=True,
              help="Serve in this process (vmfs-crypt-agent.service: logs to the journal, tells systemd when ready).")
@pass_ctx
def agent_start(c, foreground):
    """Start a key agent for this configuration (it runs until 'agent stop')."""
    sock = agent_socket(c.config)
    if AgentClient(sock).alive():
        raise AgentError(f"an agent already runs on {sock}")
    if foreground:
        from ..agent.__main__ import main as agent_main
        raise click.exceptions.Exit(agent_main(["--config", c.config.path, "--socket", sock, "--notify"]))
    pid = spawn_agent(c.config, sock, sidecar=False)
    click.echo(f"agent {pid} listening on {c.config.agent_socket}")  # scripts read the pid and socket from it


@agent.command("stop")
@click.option("--force", is_flag=True, help="Stop it even while mounts use it (their new opens then fail).")
@pass_ctx
def agent_stop(c, force):
    """Stop the key agent (open disks keep their keys; new opens need an agent)."""
    client = AgentClient(agent_socket(c.config))
    if not client.alive():
        raise AgentError(f"no agent runs on {c.config.agent_socket}")
    client.stop(force=force)
    note("agent stopped")


@agent.command("reload")
@pass_ctx
def agent_reload(c):
    """Make the agent read its configuration file again now (it also does on SIGHUP and when the file changes)."""
    resp = running_agent(c.config).request(p.OP_RELOAD)
    for line in resp["changes"]:
        note(line)
    if not resp["changes"]:
        note("no change")


def _echo_whoami(me: dict) -> None:
    if me["owner"]:
        click.echo(f"  you: {me['user']} (uid {me['uid']}), the agent's own user or root: every privilege")
    else:
        click.echo(f"  you: {me['user']} (uid {me['uid']}), roles {', '.join(me['roles']) or 'none'}: "
                   f"privileges {', '.join(me['privileges']) or 'none'}")


def status_json(c, client: AgentClient) -> dict:
    """`status --json`: field names are stable (README, "Output for scripts")."""
    me = client.request("whoami")
    st = client.request("status")
    locked = client.locked()
    providers = []
    for prov in st["providers"]:
        providers.append({"name": prov["name"], "type": prov.get("type"), "default": prov["name"] == st["default_provider"],
                          "servers": prov.get("servers"), "on_revoke": prov.get("on_revoke"),
                          "key_file": prov.get("key_file"), "backed_up": prov.get("backed_up"),
                          "broken": bool(prov.get("error")), "error": prov.get("error")})
    return {
        "agent": {"pid": st["pid"], "socket": client.socket_path, "config": st["config"],
                  "sidecar": st.get("sidecar"), "cached_keks": st["cached_keks"]},
        "you": {"user": me["user"], "uid": me["uid"], "owner": me["owner"], "roles": me["roles"],
                "privileges": me["privileges"]},
        "default_provider": st["default_provider"],
        "providers": sorted(providers, key=lambda x: x["name"]),
        "holders": st.get("holders", []),
        "locked": [{"provider": e["provider"], "keyId": e["keyId"], "disks": e["disks"], "error": e["error"],
                    "revoked": e["revoked"], "since": e["since"], "last_try": e["last_try"]} for e in locked],
        "warnings": st["warnings"],
        "operations": all_operations(),  # online encrypt/decrypt/rekey --deep in the mounts (issue 10)
    }


def _echo_status(c, client: AgentClient) -> list[dict]:
    me = client.request("whoami")
    st = client.request("status")
    locked = client.locked()
    click.echo(f"agent {st['pid']} on {c.config.agent_socket}: {st['cached_keks']} key(s) cached, "
               f"{len(locked)} locked")
    _echo_whoami(me)
    for p in st["providers"]:
        extra = f" servers {', '.join(p['servers'])}, on_revoke={p['on_revoke']}" if p.get("servers") else ""
        broken = f" BROKEN: {p['error']}" if p.get("error") else ""
        click.echo(f"  provider {p['name']} ({p['type']}){extra}{broken}")
    for h in st.get("holders", []):
        click.echo(f"  used by pid {h['pid']}: {h['what']}")
    for entry in locked:
        disks = ", ".join(entry["disks"]) or "(no disk opened yet)"
        when = time.strftime("%H:%M:%S", time.localtime(entry["last_try"]))
        click.echo(f"LOCKED key {entry['keyId']} of provider {entry['provider']}: {disks}")
        click.echo(f"  last try {when}: {entry['error']}")
    echo_operations(all_operations())
    for w in st["warnings"]:
        warn(w)
    return locked


def _status(c, as_json: bool) -> int:
    client = running_agent(c.config)
    if as_json:
        doc = status_json(c, client)
        emit_json(doc)
        return len(doc["locked"])
    return len(_echo_status(c, client))


JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Machine-readable output (README, \"Output for scripts\").")


@agent.command("status")
@JSON_OPTION
@pass_ctx
def agent_status(c, as_json):
    """Show the agent's providers, its users and the locked disks."""
    _status(c, as_json)


@click.command("status")
@JSON_OPTION
@pass_ctx
def status(c, as_json):
    """Show the agent, its providers and the locked disks (KEKs it could not fetch).

    Exits 13 when disks are locked (7 when no agent runs), so a script or a monitoring check
    can tell.
    """
    if _status(c, as_json):
        raise click.exceptions.Exit(ExitCode.LOCKED)


@click.command("unlock")
@pass_ctx
def unlock(c):
    """Fetch the KEKs of locked disks again now (after a KMS outage); no remount needed."""
    resp = running_agent(c.config).request("unlock")
    for ref in resp["unlocked"]:
        note(f"unlocked key {ref['keyId']} of provider {ref['provider']}")
    for entry in resp["locked"]:
        click.echo(f"still locked: key {entry['keyId']} of provider {entry['provider']} "
                   f"({', '.join(entry['disks']) or 'no disk yet'}): {entry['error']}", err=True)
    if resp["locked"]:
        raise AgentError(f"{len(resp['locked'])} key(s) are still locked")
    if not resp["unlocked"]:
        note("nothing was locked")


COMMANDS = [agent, status, unlock]
