"""The dashboard's files ship in the package, reach nothing outside the server, and are
served with a policy that tells the browser so."""

from __future__ import annotations

import asyncio
import re
import tomllib
from importlib import resources
from pathlib import Path

import httpx
from starlette.applications import Starlette

from smss.api import dashboard

ROOT = Path(__file__).resolve().parents[2]
#: The one absolute URL the scripts hold: SVG's XML namespace, a name, never fetched.
NAMESPACES = {"http://www.w3.org/2000/svg"}


def _files() -> dict[str, str]:
    static = resources.files("smss.api") / "static"
    names = [dashboard.PAGE, *dashboard.ASSETS]
    return {name: (static / name).read_text() for name in names}


def test_every_asset_ships_with_the_package() -> None:
    static = resources.files("smss.api") / "static"
    on_disk = {p.name for p in static.iterdir() if p.is_file()}  # type: ignore[attr-defined]
    assert on_disk == {dashboard.PAGE, *dashboard.ASSETS}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "api/static/*" in pyproject["tool"]["setuptools"]["package-data"]["smss"]


def test_nothing_is_fetched_from_elsewhere() -> None:
    for name, text in _files().items():
        urls = set(re.findall(r"(?:https?:)?//[a-zA-Z0-9.-]+\.[a-z]{2,}[^\s\"'`)]*", text))
        assert urls <= NAMESPACES, f"{name} refers to {urls - NAMESPACES}"
        for ref in re.findall(r"""(?:src|href)=["']([^"']+)""", text):
            assert ref.startswith(("/ui/", "#", "data:")), f"{name}: {ref}"
        for module in re.findall(r"""from\s+["']([^"']+)["']""", text):
            assert module.startswith("/ui/"), f"{name} imports {module}"


def _get(app: Starlette, path: str) -> httpx.Response:
    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.get(path)

    return asyncio.run(get())


class _Client:
    def __init__(self, app: Starlette) -> None:
        self.app = app

    def get(self, path: str) -> httpx.Response:
        return _get(self.app, path)


def test_pages_are_served_with_a_same_origin_policy() -> None:
    client = _Client(Starlette(routes=dashboard.routes(token_required=True)))
    page = client.get("/ui")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert 'name="smss-token-required" content="true"' in page.text
    script = client.get("/ui/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/style.css").headers["content-type"].startswith("text/css")
    missing = client.get("/ui/secrets.txt")
    assert missing.status_code == 404
    assert missing.json()["code"] == "not_found"
    assert client.get("/ui/..%2Fdashboard.py").status_code == 404
    tokenless = _get(Starlette(routes=dashboard.routes(token_required=False)), "/ui")
    assert 'content="false"' in tokenless.text
