"""``ember keys``: the coordinator's Ed25519 signing key."""

from __future__ import annotations

from pathlib import Path

import click

from coordinator.cli._common import STATE_DIR_ENV, default_state_dir, fail, stderr


def state_dir_option(fn: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--state-dir",
        envvar=STATE_DIR_ENV,
        type=click.Path(file_okay=False, path_type=Path),
        default=default_state_dir,
        show_default="~/.local/state/ember/coordinator",
        help=f"The coordinator's state directory [env {STATE_DIR_ENV}].",
    )(fn)


@click.group()
def keys() -> None:
    """The key role bundles are signed with."""


@keys.command("init")
@state_dir_option
@click.option("--force", is_flag=True, help="Replace an existing key (agents must be re-keyed).")
def keys_init(state_dir: Path, force: bool) -> None:
    """Create the coordinator's Ed25519 key and print its public half for agents.

    Put the printed `ed25519:...` line in each agent's `[trust] coordinator_keys`.
    """
    from coordinator.bundles import KeyFileError, init_key, key_path, public_text

    try:
        key, created = init_key(state_dir, force=force)
    except (KeyFileError, OSError) as exc:
        fail(str(exc))
    path = key_path(state_dir)
    stderr(f"wrote {path} (mode 0600)" if created else f"{path} exists; kept it (--force replaces)")
    click.echo(public_text(key))


@keys.command("show")
@state_dir_option
def keys_show(state_dir: Path) -> None:
    """Print the public key agents must trust."""
    from coordinator.bundles import KeyFileError, load_key, public_text

    try:
        click.echo(public_text(load_key(state_dir)))
    except KeyFileError as exc:
        fail(str(exc))
