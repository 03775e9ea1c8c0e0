"""Helpers the web tests share: a node with its HTTP server on a free loopback port, and a logged-in client."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
from starlette.routing import BaseRoute

from conftest import make_config
from node.app import Node
from node.config import Config, with_overrides
from storage.users import add_user

PASSWORDS = {"ada": "ada-password-1", "olga": "olga-password-1", "vic": "vic-password-1"}
ROLES = {"ada": "admin", "olga": "operator", "vic": "viewer"}
HTML = {"accept": "text/html"}


@contextmanager
def web_node(
    workdir: Path,
    roles: tuple[str, ...] = ("listen",),
    mounts: Sequence[BaseRoute] = (),
    config: Config | None = None,
    **sections: dict,
) -> Iterator[Node]:
    """A node running ``roles`` and its web server on a free port, with the users of ``PASSWORDS``.

    ``config`` (from ``conftest.make_config``) replaces the default test config; ``sections`` override it.
    """
    web = {"port": 0, **sections.pop("web", {})}
    config = with_overrides(config or make_config(workdir), web=web, **sections)
    node = Node(config)
    node.start(roles)
    for name, password in PASSWORDS.items():
        add_user(node.index, name, ROLES[name], password)
    node.start_web(mounts)
    try:
        yield node
    finally:
        node.stop()


def base_url(node: Node) -> str:
    """Where the node's web server answers."""
    assert node.web is not None and node.web.port
    return f"http://127.0.0.1:{node.web.port}"


def csrf_of(html: str) -> str:
    """The CSRF token of the first form in a page."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "page has no CSRF token"
    return match.group(1)


def carry_cookie(client: httpx.Client, response: httpx.Response) -> None:
    """Keep the session cookie a response set, also over plain HTTP (it is marked Secure)."""
    for header in response.headers.get_list("set-cookie"):
        name, _, rest = header.partition("=")
        client.cookies.set(name, rest.split(";", 1)[0])


def login(client: httpx.Client, name: str, password: str | None = None) -> httpx.Response:
    """Log in through the form as a browser does: GET /login for its token, POST the form."""
    page = client.get("/login")
    carry_cookie(client, page)
    response = client.post(
        "/login",
        data={
            "username": name,
            "password": PASSWORDS[name] if password is None else password,
            "csrf_token": csrf_of(page.text),
            "next": "/studies",
        },
    )
    carry_cookie(client, response)
    return response


def logged_in(node: Node, name: str) -> httpx.Client:
    """A client with a session of ``name``."""
    client = httpx.Client(base_url=base_url(node), headers=HTML)
    assert login(client, name).status_code == 303
    return client
