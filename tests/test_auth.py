"""Logins and roles: with authentication on, every route the app adds or replaces wants a valid token
from the site's OpenID Connect provider and exactly the role that fits, checked route by route against
a real provider (node-oidc-provider, tests/identity_provider/) on 127.0.0.1, through the real clients."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import jwt
import pytest
import requests
from conftest import slicer_client_module
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import APIRouter, FastAPI
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from monailabel_metaapp.devserver import free_port, stop_process
from monailabel_metaapp.lib import auth, background_routes, offload, ohif, site_routes
from monailabel_metaapp.lib.cls import routes as cls_routes
from monailabel_metaapp.lib.seg import routes as seg_routes

IDP = Path(__file__).resolve().parent / "identity_provider"
ROLES = ("user", "annotator", "reviewer", "admin")

# Every route the app adds or replaces: (method, path template, a request to it, the role it needs).
# The requests name things that do not exist where they would change state, so a role that holds the
# route reaches the handler (200, 404, or 422 where no file is sent) and nothing stored changes.
APP_ROUTES = [
    ("GET", "/metaapp/structures", "/metaapp/structures", "user"),
    ("GET", "/metaapp/activelearning/{strategy}", "/metaapp/activelearning/uncertainty", "user"),
    ("GET", "/metaapp/site", "/metaapp/site", "user"),
    ("GET", "/metaapp/background", "/metaapp/background", "user"),
    ("GET", "/metaapp/classes", "/metaapp/classes", "user"),
    ("GET", "/ohif/{path:path}", "/ohif/index.html", "user"),
    ("PUT", "/metaapp/classes/{image_id}", "/metaapp/classes/no_such_study", "annotator"),
    ("DELETE", "/metaapp/classes/{image_id}", "/metaapp/classes/no_such_study", "annotator"),
    ("POST", "/scoring/{method}", "/scoring/metaapp_al", "annotator"),
    ("POST", "/metaapp/structures/{name}/rollback", "/metaapp/structures/no_such_structure/rollback", "admin"),
    ("POST", "/metaapp/site/rollback", "/metaapp/site/rollback?model=no_such_model", "admin"),
    # pause, then resume: background learning is left running as it was
    ("POST", "/metaapp/background/pause", "/metaapp/background/pause", "admin"),
    ("POST", "/metaapp/background/resume", "/metaapp/background/resume", "admin"),
    ("POST", "/train/{model}", "/train/fewshot_seg", "admin"),
    ("POST", "/train/fewshot_cls", "/train/fewshot_cls", "admin"),
    # MONAI Label's own routes that the app serves off the event loop, with MONAI Label's roles
    ("POST", "/infer/{model}", "/infer/fewshot_seg?image=no_such_study", "user"),
    ("GET", "/datastore/image", "/datastore/image?image=no_such_study", "user"),
    ("POST", "/activelearning/{strategy}", "/activelearning/random", "user"),
    ("PUT", "/datastore/label", "/datastore/label?image=no_such_study", "annotator"),  # no file sent: 422
]
# MONAI Label's own routes, which now validate tokens through the app's check too
STOCK_ROUTES = [("GET", "/info/", "user"), ("GET", "/datastore/?output=stats", "user")]


@pytest.fixture(scope="module")
def identity_provider(tmp_path_factory) -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are needed to run the OpenID Connect provider of these tests")
    if not (IDP / "node_modules" / "oidc-provider").is_dir():
        r = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=IDP, capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"npm ci of the OpenID Connect provider failed (no npm registry?): {r.stderr[-400:]}")
    port = free_port()
    log = tmp_path_factory.mktemp("idp") / "provider.log"
    proc = subprocess.Popen(
        [node, "provider.mjs"], cwd=IDP, env=dict(os.environ, PORT=str(port)), stdout=log.open("wb"), stderr=-2
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(60):
        try:
            if requests.get(f"{url}/.well-known/openid-configuration", timeout=2).ok:
                break
        except requests.RequestException:
            time.sleep(0.5)
    else:
        stop_process(proc)
        pytest.fail(f"the OpenID Connect provider did not start:\n{log.read_text()}")
    yield url
    stop_process(proc)


def token(provider: str, who: str) -> str:
    """An access token by the client-credentials grant for `metaapp-{who}`."""
    data = {"grant_type": "client_credentials", "client_id": f"metaapp-{who}", "client_secret": f"{who}-secret"}
    r = requests.post(f"{provider}/token", data=data, timeout=10)
    r.raise_for_status()
    return r.json()["access_token"]


def call(url: str, method: str, path: str, bearer: str | None) -> int:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    body = {"class": "benign"} if method == "PUT" else None
    return requests.request(method, url + path, json=body, headers=headers, timeout=60).status_code


def test_the_matrix_names_every_route_the_app_mounts():
    """A route added to the app without a row here (and so without a tested role) fails this test."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    seg_routes.install(app, {})
    site_routes.install(app, {})
    background_routes.install(app)
    cls_routes.install(app, None, "fewshot_cls")
    ohif.install(app)
    offload.install(app)
    # FastAPI keeps an included router as one entry that holds its routes
    mounted = [r for e in app.router.routes for r in getattr(getattr(e, "original_router", None), "routes", [e])]
    assert {(m, r.path) for r in mounted for m in r.methods} == {(m, p) for m, p, _, _ in APP_ROUTES}
    assert all(auth.guarded(r) for r in mounted)


def test_a_route_without_a_role_is_refused_at_start_up():
    router = APIRouter()

    @router.get("/metaapp/open")
    async def open_route():
        return {}

    with pytest.raises(RuntimeError, match="/metaapp/open"):
        auth.include_first(FastAPI(), router)


def test_listening_beyond_this_machine_without_logins_is_said_loudly():
    assert auth.exposure_warning("127.0.0.1") is None and auth.exposure_warning("::1") is None
    assert auth.exposure_warning("localhost") is None
    for host in ("0.0.0.0", "10.1.2.3", "annotation.example.org"):
        assert "authentication OFF" in auth.exposure_warning(host)


def test_each_role_gets_exactly_its_routes_and_a_missing_or_bad_token_gets_401(
    identity_provider, sample_store, start_server
):
    admin = token(identity_provider, "everyone")
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": identity_provider}
    server = start_server(sample_store, env=env, headers={"Authorization": f"Bearer {admin}"})
    tokens = {who: token(identity_provider, who) for who in (*ROLES, "norole", "everyone")}
    expiring = token(identity_provider, "expiring")
    forged = forge(tokens["everyone"])
    time.sleep(2)  # the expiring token is now expired

    wrong = []
    for method, _, path, role in APP_ROUTES + [(m, p, p, r) for m, p, r in STOCK_ROUTES]:
        for bearer, expect in ((None, 401), (expiring, 401), (forged, 401), ("not-a-jwt", 401)):
            if (got := call(server.url, method, path, bearer)) != expect:
                wrong.append((method, path, "bad token", got))
        for who, bearer in tokens.items():
            got = call(server.url, method, path, bearer)
            allowed = who == "everyone" or who == role
            reached = (200, 404, 422) if path.startswith("/datastore/label") else (200, 404)
            if (allowed and got not in reached) or (not allowed and got != 403):
                wrong.append((method, path, who, got))
    assert not wrong, f"(method, path, token, status) not as the role matrix says: {wrong}\n{server.log_tail(20)}"

    # the real clients carry the token as Slicer and scripts do
    for Client in (MONAILabelClient, slicer_client_module().MONAILabelClient):
        client = Client(server.url)
        with pytest.raises(MONAILabelClientException if Client is MONAILabelClient else Exception, match="401"):
            client.info()
        client.update_auth({"token_type": "Bearer", "access_token": tokens["user"]})
        assert "fewshot_seg" in client.info()["models"]


def forge(genuine: str) -> str:
    """The same claims and key id, signed with a key the provider never had."""
    header = jwt.get_unverified_header(genuine)
    claims = jwt.decode(genuine, options={"verify_signature": False})
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": header["kid"]})
