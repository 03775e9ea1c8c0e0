"""Login over the real HTTP server: every route refused without a user, lock-out, CSRF, tokens, roles."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from node.web.app import PUBLIC_PATHS
from storage.users import create_token, failed_logins
from webnode import HTML, PASSWORDS, base_url, carry_cookie, csrf_of, logged_in, login, web_node


async def _mounted(request: Request) -> JSONResponse:
    return JSONResponse({"mounted": True})


MOUNTS = [Mount("/dicom-web", routes=[Route("/studies", _mounted)])]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    with web_node(tmp_path_factory.mktemp("web") / "node", mounts=MOUNTS) as n:
        yield n


def _every_route(node) -> list[tuple[str, str]]:  # noqa: ANN001
    """(method, path) of every route the app serves, path parameters filled with a UID."""
    out = []

    def walk(routes, prefix: str = "") -> None:  # noqa: ANN001
        for route in routes:
            path = prefix + re.sub(r"\{[^}]+\}", "1.2.3", route.path)
            if isinstance(route, Mount):
                walk(route.routes, path)
                continue
            for method in sorted(route.methods or {"GET"}):
                if method != "HEAD":
                    out.append((method, path))

    walk(node.web.app.routes)
    return out


def test_every_route_needs_a_user(node) -> None:  # noqa: ANN001
    routes = _every_route(node)
    assert ("GET", "/dicom-web/studies") in routes and ("POST", "/api/deliveries/resend") in routes
    with httpx.Client(base_url=base_url(node)) as client:
        for method, path in routes:
            if path in PUBLIC_PATHS:
                continue
            api = client.request(method, path)
            assert api.status_code == 401, (method, path, api.status_code)
            assert api.headers["www-authenticate"].startswith("Bearer")  # never a Basic challenge
            page = client.request(method, path, headers=HTML)
            expected = 303 if method == "GET" else 401
            assert page.status_code == expected, (method, path, page.status_code)
        assert client.get("/studies", headers=HTML).headers["location"] == "/login?next=/studies"
        # the public few answer without a session
        assert client.get("/healthz").json() == {"alive": True}
        assert client.get("/metrics").status_code == 200
        assert client.get("/login").status_code == 200


def test_login_sets_a_secure_httponly_samesite_cookie_and_opens_every_page(node) -> None:  # noqa: ANN001
    client = httpx.Client(base_url=base_url(node), headers=HTML)
    response = login(client, "vic")
    assert response.status_code == 303 and response.headers["location"] == "/studies"
    cookie = response.headers["set-cookie"].lower()
    assert "harmonode_session=" in cookie
    assert "; secure" in cookie and "; httponly" in cookie and "samesite=strict" in cookie
    for method, path in _every_route(node):
        if method == "GET" and path not in PUBLIC_PATHS and "1.2.3" not in path:
            assert client.get(path).status_code in (200, 303), path
    assert client.get("/dicom-web/studies").json() == {"mounted": True}  # a mount is behind the same login
    assert client.get("/series/1.2.3").status_code == 404


def test_wrong_password_is_refused_counted_and_locks_out(node) -> None:  # noqa: ANN001
    client = httpx.Client(base_url=base_url(node), headers=HTML)
    assert login(client, "olga", "not-the-password").status_code == 401
    assert failed_logins(node.index, "olga") == 1
    for _ in range(4):
        assert login(client, "olga", "still-wrong").status_code == 401
    assert failed_logins(node.index, "olga") == 5
    locked = login(client, "olga")  # the right password, but the name is locked
    assert locked.status_code == 429 and "Too many failed logins" in locked.text
    basic = base64.b64encode(f"olga:{PASSWORDS['olga']}".encode()).decode()
    assert httpx.get(base_url(node) + "/api/whoami", headers={"authorization": f"Basic {basic}"}).status_code == 429
    assert login(client, "ada").status_code == 303  # other names are not affected


def test_unknown_user_is_refused_like_a_wrong_password(node) -> None:  # noqa: ANN001
    client = httpx.Client(base_url=base_url(node), headers=HTML)
    page = client.get("/login")
    carry_cookie(client, page)
    response = client.post(
        "/login", data={"username": "nobody", "password": "whatever-1", "csrf_token": csrf_of(page.text)}
    )
    assert response.status_code == 401 and "Wrong user name or password" in response.text
    assert failed_logins(node.index, "nobody") == 1


def test_forms_need_their_csrf_token(node) -> None:  # noqa: ANN001
    fresh = httpx.Client(base_url=base_url(node), headers=HTML)
    carry_cookie(fresh, fresh.get("/login"))
    no_token = fresh.post("/login", data={"username": "ada", "password": PASSWORDS["ada"]})
    assert no_token.status_code == 403  # the login form too
    admin = logged_in(node, "ada")
    assert admin.post("/deliveries/resend", data={"destination": ""}).status_code == 403
    assert admin.post("/deliveries/resend", data={"destination": "", "csrf_token": "forged"}).status_code == 403
    token = csrf_of(admin.get("/deliveries").text)
    ok = admin.post("/deliveries/resend", data={"destination": "", "csrf_token": token})
    assert ok.status_code == 303 and ok.headers["location"] == "/deliveries?requeued=0"
    assert admin.post("/api/deliveries/resend", headers={"x-csrf-token": token}).json() == {"requeued": 0}
    assert admin.post("/logout", data={"csrf_token": token}).status_code == 303
    assert admin.get("/studies").status_code == 303  # the old cookie, replayed, is refused: ended on the server


def test_admin_actions_are_refused_to_viewers_and_operators(node) -> None:  # noqa: ANN001
    for name in ("vic", "olga"):
        if name == "olga":
            node.index.db.conn.execute("DELETE FROM login_failures WHERE name='olga'")
        client = logged_in(node, name)
        page = client.get("/deliveries")
        assert "Resend dead" not in page.text
        token = csrf_of(page.text)
        assert client.post("/deliveries/resend", data={"destination": "", "csrf_token": token}).status_code == 403
        assert client.post("/rules/activate", data={"rule": "x", "csrf_token": token}).status_code == 403


def test_api_tokens_act_with_their_users_role(node) -> None:  # noqa: ANN001
    viewer = {"authorization": f"Bearer {create_token(node.index, 'vic', 'a script')}"}
    admin = {"authorization": f"Bearer {create_token(node.index, 'ada')}"}
    url = base_url(node)
    assert httpx.get(url + "/api/whoami", headers=viewer).json() == {"user": "vic", "role": "viewer", "via": "token"}
    assert httpx.get(url + "/api/status", headers=viewer).status_code == 200
    assert httpx.post(url + "/api/deliveries/resend", headers=viewer).status_code == 403
    assert httpx.post(url + "/api/deliveries/resend", headers=admin).json() == {"requeued": 0}  # no CSRF: no cookie
    assert httpx.post(url + "/api/rules/nope/activate", headers=admin).status_code == 404
    assert httpx.get(url + "/api/status", headers={"authorization": "Bearer hn_forged"}).status_code == 401
    basic = base64.b64encode(f"ada:{PASSWORDS['ada']}".encode()).decode()
    assert httpx.get(url + "/api/whoami", headers={"authorization": f"Basic {basic}"}).json()["via"] == "basic"
    stored = node.index.query("SELECT token_sha256 FROM api_tokens")
    assert all(len(r["token_sha256"]) == 64 for r in stored)  # kept hashed, never the token


def test_session_secret_persists_with_owner_only_permissions(node) -> None:  # noqa: ANN001
    secret = Path(node.config.data_path) / "web" / "secret"
    assert secret.stat().st_mode & 0o077 == 0
    assert len(secret.read_text().strip()) >= 32
