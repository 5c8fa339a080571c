"""The vmfs-crypt command line (click): user errors end in one line and a numbered exit code (errors.ExitCode)."""

import logging
import sys

import click

from .. import __version__
from ..crypto.native import native, reason
from ..errors import ExitCode, VmfsCryptError
from ..sysutil import disable_core_dumps
from . import agent, audit, disk, mount, online, policy, provider
from .common import Ctx, Group

DATA_PATH = f"native, {reason}" if native is not None else f"python, {reason}"


# -h is --help on every command: the context settings are inherited by every subcommand.
@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vmfs-crypt",
                      message=f"%(prog)s %(version)s (data path: {DATA_PATH})")
@click.option("--config", "config_path", envvar="VMFS_CRYPT_CONFIG", type=click.Path(dir_okay=False),
              help="Configuration file (default: ~/.config/vmfs-crypt/config.toml, or $VMFS_CRYPT_CONFIG).")
@click.option("--quiet", "-q", is_flag=True, help="Errors only: no confirmations, warnings or progress.")
@click.option("--verbose", "-v", count=True, help="More detail: log records on stderr (-vv: debug).")
@click.pass_context
def cli(ctx, config_path, quiet, verbose):
    """Encrypt VM disks at rest, vSphere style, and show them in plaintext through a FUSE mount."""
    disable_core_dumps()  # commands such as encrypt and cat hold DEKs in this process
    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose exclude each other")
    if verbose:
        logging.basicConfig(level=logging.INFO if verbose == 1 else logging.DEBUG, stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    elif quiet:
        logging.basicConfig(level=logging.ERROR, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    ctx.obj = Ctx(config_path, quiet=quiet, verbose=verbose)


for command in disk.COMMANDS + mount.COMMANDS + agent.COMMANDS + audit.COMMANDS + policy.COMMANDS + online.COMMANDS:
    cli.add_command(command)
cli.add_command(provider.provider)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        argv = mount.helper_argv(argv, cli.commands) or argv  # `vmfs-crypt DATASTORE MOUNTPOINT -o OPTS` (mount.fuse)
        status = cli.main(args=argv, prog_name="vmfs-crypt", standalone_mode=False)
        # A command that ends with click.exceptions.Exit(code) (e.g. `info` of a damaged folder,
        # after its report) comes back here as that code.
        return int(status) if isinstance(status, int) else ExitCode.OK
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return ExitCode.INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return ExitCode.USAGE
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except VmfsCryptError as exc:
        click.echo(f"vmfs-crypt: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return ExitCode.INTERRUPTED
    except OSError as exc:
        click.echo(f"vmfs-crypt: {exc.filename}: {exc.strerror}" if exc.filename else f"vmfs-crypt: {exc}", err=True)
        return ExitCode.OS_ERROR


if __name__ == "__main__":
    sys.exit(main())
