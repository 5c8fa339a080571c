"""Mount commands: mount (in the background, or --foreground for systemd) and umount; --name for [mounts.NAME].

A configured mount (`--name`) is started and stopped by the agent, as the agent's user
(issue 11): a vm-operator may do that and gets no key; the mount's file permissions decide
what it may then read and write.
"""

import logging

import click

from ..agent import protocol as p
from ..errors import UsageError
from ..ops import mounting
from ..procs import ReadyPipe
from .common import pass_ctx, running_agent, warn_backup


@click.command()
@click.argument("datastore", type=click.Path(file_okay=False), required=False)
@click.argument("mountpoint", type=click.Path(file_okay=False), required=False)
@click.option("--name", help="Start the mount configured as [mounts.NAME] in the agent's configuration.")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground (logs to stderr).")
@click.option("-o", "options", help="FUSE options, comma-separated (e.g. max_read=131072).")
@click.option("--allow-other", is_flag=True, help="Let other users use the mount (needs user_allow_other).")
@click.option("--agent", "agent_socket", type=click.Path(), help="Socket of a running key agent to use.")
@pass_ctx
def mount(c, datastore, mountpoint, name, foreground, options, allow_other, agent_socket):
    """Mount DATASTORE at MOUNTPOINT in plaintext (or start the configured mount --name NAME)."""
    if name:
        if datastore or mountpoint or foreground or options or allow_other or agent_socket:
            raise UsageError("--name NAME takes no other arguments: the agent's [mounts.NAME] table has them")
        resp = running_agent(c.config).request(p.OP_MOUNT_START, name=name)
        click.echo(f"mounted {name} at {resp['mountpoint']}")
        return
    if not datastore or not mountpoint:
        raise UsageError("mount needs DATASTORE and MOUNTPOINT (or --name NAME)")
    if foreground:
        from ..fuse.serve import run_mount  # only this path loads FUSE
        logging.basicConfig(level=logging.INFO, format="%(asctime)s mount[%(process)d] %(levelname)s %(message)s")
        run_mount(c.config, datastore, mountpoint, agent_socket, options, allow_other, ReadyPipe(None))
        return
    log_path = mounting.mount_background(c.config, datastore, mountpoint, agent_socket, options, allow_other)
    click.echo(f"mounted {datastore} at {mountpoint} (log: {log_path})")
    warn_backup(c.config)


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False), required=False)
@click.option("--name", help="Stop the mount configured as [mounts.NAME] (through the agent).")
@pass_ctx
def umount(c, mountpoint, name):
    """Unmount a vmfs-crypt mount."""
    if name:
        if mountpoint:
            raise UsageError("umount takes MOUNTPOINT or --name NAME, not both")
        resp = running_agent(c.config).request(p.OP_MOUNT_STOP, name=name)
        click.echo(f"unmounted {name} at {resp['mountpoint']}")
        return
    if not mountpoint:
        raise UsageError("umount needs MOUNTPOINT (or --name NAME)")
    mounting.umount(mountpoint)
    click.echo(f"unmounted {mountpoint}")


COMMANDS = [mount, umount]
