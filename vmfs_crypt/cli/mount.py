"""Mount commands: mount (in the background, or --foreground for systemd) and umount."""

import logging

import click

from ..ops import mounting
from ..procs import ReadyPipe
from .common import pass_ctx, warn_backup


@click.command()
@click.argument("datastore", type=click.Path(file_okay=False))
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground (logs to stderr).")
@click.option("-o", "options", help="FUSE options, comma-separated (e.g. max_read=131072).")
@click.option("--allow-other", is_flag=True, help="Let other users use the mount (needs user_allow_other).")
@click.option("--agent", "agent_socket", type=click.Path(), help="Socket of a running key agent to use.")
@pass_ctx
def mount(c, datastore, mountpoint, foreground, options, allow_other, agent_socket):
    """Mount DATASTORE at MOUNTPOINT in plaintext."""
    if foreground:
        from ..fuse.serve import run_mount  # only this path loads FUSE
        logging.basicConfig(level=logging.INFO, format="%(asctime)s mount[%(process)d] %(levelname)s %(message)s")
        run_mount(c.config, datastore, mountpoint, agent_socket, options, allow_other, ReadyPipe(None))
        return
    log_path = mounting.mount_background(c.config, datastore, mountpoint, agent_socket, options, allow_other)
    click.echo(f"mounted {datastore} at {mountpoint} (log: {log_path})")
    warn_backup(c.config)


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
def umount(mountpoint):
    """Unmount a vmfs-crypt mount."""
    mounting.umount(mountpoint)
    click.echo(f"unmounted {mountpoint}")


COMMANDS = [mount, umount]
