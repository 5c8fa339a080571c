"""Agent commands: agent start|stop|status, and status / unlock of locked disks."""

import time

import click

from ..agent.client import AgentClient
from ..agent.launcher import agent_socket, spawn_agent
from ..errors import AgentError
from .common import pass_ctx, running_agent


@click.group()
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
    click.echo(f"agent {pid} listening on {c.config.agent_socket}")


@agent.command("stop")
@click.option("--force", is_flag=True, help="Stop it even while mounts use it (their new opens then fail).")
@pass_ctx
def agent_stop(c, force):
    """Stop the key agent (open disks keep their keys; new opens need an agent)."""
    client = AgentClient(agent_socket(c.config))
    if not client.alive():
        raise AgentError(f"no agent runs on {c.config.agent_socket}")
    client.stop(force=force)
    click.echo("agent stopped")


def _echo_whoami(me: dict) -> None:
    if me["owner"]:
        click.echo(f"  you: {me['user']} (uid {me['uid']}), the agent's own user or root: every privilege")
    else:
        click.echo(f"  you: {me['user']} (uid {me['uid']}), roles {', '.join(me['roles']) or 'none'}: "
                   f"privileges {', '.join(me['privileges']) or 'none'}")


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
    for w in st["warnings"]:
        click.echo(f"warning: {w}", err=True)
    return locked


@agent.command("status")
@pass_ctx
def agent_status(c):
    """Show the agent's providers, its users and the locked disks."""
    _echo_status(c, running_agent(c.config))


@click.command("status")
@pass_ctx
def status(c):
    """Show the agent, its providers and the locked disks (KEKs it could not fetch)."""
    _echo_status(c, running_agent(c.config))


@click.command("unlock")
@pass_ctx
def unlock(c):
    """Fetch the KEKs of locked disks again now (after a KMS outage); no remount needed."""
    resp = running_agent(c.config).request("unlock")
    for ref in resp["unlocked"]:
        click.echo(f"unlocked key {ref['keyId']} of provider {ref['provider']}")
    for entry in resp["locked"]:
        click.echo(f"still locked: key {entry['keyId']} of provider {entry['provider']} "
                   f"({', '.join(entry['disks']) or 'no disk yet'}): {entry['error']}", err=True)
    if resp["locked"]:
        raise AgentError(f"{len(resp['locked'])} key(s) are still locked")
    if not resp["unlocked"]:
        click.echo("nothing was locked")


COMMANDS = [agent, status, unlock]
