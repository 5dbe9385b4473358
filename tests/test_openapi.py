"""``GET /openapi.json`` describes the sidecar's HTTP API, and stays true: every route served is
described, every described route is served, with the statuses the handlers answer."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from mmcache.sidecar.openapi import openapi_document
from mmcache.sidecar.server import create_app
from mmcache.sidecar.config import ServeConfig
from sidecar import SidecarProcess

METHODS = {"get", "put", "post", "delete", "head"}


def _served(tmp_path) -> set[tuple[str, str]]:
    """(method, path) of each route, less the HEAD aiohttp adds to every GET (HTTP's own rule,
    not a route of ours); a HEAD with a handler of its own (the entry's) stays."""
    app = create_app(ServeConfig(data_dir=str(tmp_path)))
    routes = [r for r in app.router.routes() if r.method.lower() in METHODS]
    gets = {r.resource.canonical: r.handler for r in routes if r.method == "GET"}
    return {(r.method.lower(), r.resource.canonical) for r in routes
            if not (r.method == "HEAD" and gets.get(r.resource.canonical) is r.handler)}


def test_every_route_is_described_and_every_description_is_served(tmp_path):
    doc = openapi_document()
    assert doc["openapi"] == "3.1.0"
    described = {(m, path) for path, item in doc["paths"].items() for m in item if m in METHODS}
    assert described == _served(tmp_path)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            assert op["responses"] and op.get("summary"), (method, path)
            for status in op["responses"]:
                assert status.isdigit() and 200 <= int(status) < 600
            if method not in ("get", "head") or path != "/healthz":
                assert path == "/healthz" or "401" in op["responses"], (method, path)


def test_the_document_is_served_behind_the_token(tmp_path):
    sc = SidecarProcess("--data-dir", str(tmp_path / "d"), env={"MMCACHE_TOKEN": "t0ken"}).start()
    try:
        with __import__("pytest").raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(sc.url + "/openapi.json", timeout=10)
        assert refused.value.code == 401
        req = urllib.request.Request(sc.url + "/openapi.json", headers={"Authorization": "Bearer t0ken"})
        with urllib.request.urlopen(req, timeout=10) as r:
            doc = json.loads(r.read())
        assert doc == json.loads(json.dumps(openapi_document()))
        assert doc["paths"]["/v1/claims"]["post"]["responses"]["429"]["headers"]["Retry-After"]
    finally:
        sc.stop()
