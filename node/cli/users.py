"""``harmonode users add|list|token|remove``: the console's users and the API tokens of scripts.

``users add NAME --role admin|operator|viewer`` reads the password from standard input (one line; typed
twice at a terminal), so it never lands in the shell's history or the process list. The users live in
the node's index (``storage.users``); a running node sees a new user at once.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from node.cli import ConfigOption, fail, load_or_fail
from storage.store import open_store
from storage.users import UserError, add_user, create_token, list_users, remove_user, revoke_tokens

users_app = typer.Typer(help="Console users (login, roles) and API tokens for scripts.", no_args_is_help=True)


def _read_password() -> str:
    if sys.stdin.isatty():
        import getpass

        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise fail("the two passwords differ")
        return first
    line = sys.stdin.readline()
    return line.rstrip("\r\n")


@users_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="User name (letters, digits, . _ @ -).")],
    role: Annotated[str, typer.Option("--role", help="admin | operator | viewer.")] = "viewer",
    replace: Annotated[
        bool, typer.Option("--replace", help="Change the role and password of an existing user.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Add a user; the password is read from standard input (at least 8 characters)."""
    cfg = load_or_fail(config)
    password = _read_password()
    with open_store(cfg.data_path, cfg.store_settings) as store:
        try:
            user = add_user(store.index, name, role, password, replace=replace)
        except UserError as exc:
            raise fail(str(exc)) from exc
    typer.echo(f"user {user.name} ({user.role}) {'updated' if replace else 'added'}")


@users_app.command("list")
def list_(config: ConfigOption = None) -> None:
    """List users with their roles and number of API tokens."""
    cfg = load_or_fail(config)
    with open_store(cfg.data_path, cfg.store_settings) as store:
        rows = list_users(store.index)
    if not rows:
        typer.echo("no users (add one: echo PASSWORD | harmonode users add NAME --role admin)")
    for row in rows:
        typer.echo(f"{row['name']:<24} {row['role']:<9} tokens={row['tokens']}")


@users_app.command("token")
def token(
    name: Annotated[str, typer.Argument(help="The user the token acts as (with that user's role).")],
    label: Annotated[str, typer.Option(help="What the token is for (shown nowhere but the index).")] = "",
    revoke: Annotated[bool, typer.Option("--revoke", help="Remove every token of the user instead.")] = False,
    config: ConfigOption = None,
) -> None:
    """Print a new API token (``Authorization: Bearer …``); it is shown once and kept only as a hash."""
    cfg = load_or_fail(config)
    with open_store(cfg.data_path, cfg.store_settings) as store:
        if revoke:
            typer.echo(f"{revoke_tokens(store.index, name)} token(s) of {name} revoked")
            return
        try:
            typer.echo(create_token(store.index, name, label))
        except UserError as exc:
            raise fail(str(exc)) from exc


@users_app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="User name.")], config: ConfigOption = None) -> None:
    """Remove a user and its API tokens."""
    cfg = load_or_fail(config)
    with open_store(cfg.data_path, cfg.store_settings) as store:
        if not remove_user(store.index, name):
            raise fail(f"no user {name!r}")
    typer.echo(f"user {name} removed")


def register(app: typer.Typer) -> None:
    """Add the ``users`` group to the ``harmonode`` command line."""
    app.add_typer(users_app, name="users")
