"""Logins and roles on every route the app adds or replaces.

With `MONAI_LABEL_AUTH_ENABLE=true` MONAI Label checks a bearer token from the site's OpenID Connect
provider and a role (`RBAC`) on its own routes. The app's routes take the same check through `USER`,
`ANNOTATOR` and `ADMIN`, and `include_first` refuses to mount a route without one, so a new route
cannot slip in unguarded. Roles follow MONAI Label's: reading and inference for `user`; saving,
corrections and score refreshes for `annotator`; training, rollback and meta-training for `admin`.

MONAI Label 0.8.5 reads the signing key from Keycloak's realm document only, and calls PyJWT without
the `algorithms` argument that PyJWT 2 requires, so no token validates. `install` replaces its token
check with one that takes the keys from the provider's discovery document (`jwks_uri`), which Keycloak
and every other OpenID Connect provider publish, and checks signature and expiry as MONAI Label meant
to. A provider that cannot be reached gives 503, not 500.
"""

from __future__ import annotations

import functools
import ipaddress
import logging

import jwt
import requests
from fastapi import APIRouter, Depends, FastAPI, HTTPException
from monailabel.config import settings
from monailabel.endpoints.user import auth as ml_auth

logger = logging.getLogger(__name__)

USER = Depends(ml_auth.RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
ANNOTATOR = Depends(ml_auth.RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))
ADMIN = Depends(ml_auth.RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))
SIGNING_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]


@functools.cache
def _jwks(realm_uri: str) -> jwt.PyJWKClient:
    """The provider's key set, from its discovery document (fetched once; keys cached for 5 min)."""
    url = f"{realm_uri.rstrip('/')}/.well-known/openid-configuration"
    r = requests.get(url, timeout=settings.MONAI_LABEL_AUTH_TIMEOUT)
    r.raise_for_status()
    uri = r.json().get("jwks_uri")
    if not uri:
        raise ValueError(f"{url} names no jwks_uri")
    return jwt.PyJWKClient(uri, lifespan=300, timeout=settings.MONAI_LABEL_AUTH_TIMEOUT)


def roles_of(payload: dict) -> list[str]:
    """The token's roles at `MONAI_LABEL_AUTH_TOKEN_ROLES` (`#` separates nested claims, as in Keycloak's
    default `realm_access#roles`)."""
    value: object = payload
    for part in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
        value = value.get(part) if isinstance(value, dict) else None
    return [str(r) for r in value] if isinstance(value, list) else []


def from_token(token: str) -> ml_auth.User:
    """The user a bearer token names, after checking its signature and expiry against the provider's keys.

    Args:
        token: the bearer token (a signed JWT).

    Raises:
        jwt.InvalidTokenError: bad signature, expired, or not a JWT (MONAI Label answers 401).
        HTTPException: 503 when the provider or its keys cannot be fetched.
    """
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return ml_auth.DEFAULT_USER
    realm = settings.MONAI_LABEL_AUTH_REALM_URI
    try:
        key = _jwks(realm).get_signing_key_from_jwt(token)
    except (requests.RequestException, ValueError, jwt.PyJWKClientConnectionError) as e:
        _jwks.cache_clear()  # try the provider again on the next request
        raise HTTPException(503, f"the identity provider at {realm} cannot be reached: {e}") from e
    except jwt.PyJWKClientError as e:  # no key with the token's kid
        raise jwt.InvalidTokenError(str(e)) from e
    payload = jwt.decode(token, key, algorithms=SIGNING_ALGORITHMS, options={"verify_aud": False, "require": ["exp"]})
    return ml_auth.User(
        username=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or payload.get("sub", ""),
        email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
        name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
        roles=roles_of(payload),
    )


def install() -> None:
    """Make MONAI Label's routes and the app's check tokens with `from_token`."""
    ml_auth.from_token = from_token  # `get_current_user` looks it up at each request
    if settings.MONAI_LABEL_AUTH_ENABLE:
        logger.info("authentication on: tokens from %s", settings.MONAI_LABEL_AUTH_REALM_URI)


def guarded(route) -> bool:
    """Whether a route checks a role (MONAI Label's `RBAC`)."""
    return any(isinstance(d.call, ml_auth.RBAC) for d in route.dependant.dependencies)


def include_first(app: FastAPI, router: APIRouter) -> None:
    """Mount a router's routes ahead of every route already there, so they override MONAI Label's.

    Raises:
        RuntimeError: a route checks no role.
    """
    open_routes = [r.path for r in router.routes if not guarded(r)]
    if open_routes:
        raise RuntimeError(f"routes without a role check: {open_routes}")
    before = len(app.router.routes)
    app.include_router(router)
    added = app.router.routes[before:]  # FastAPI may add one entry per router, not per route
    del app.router.routes[before:]
    app.router.routes[0:0] = added


def exposure_warning(host: str) -> str | None:
    """A warning when the server would listen beyond this machine with no login required."""
    if settings.MONAI_LABEL_AUTH_ENABLE:
        return None
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name: assume it reaches beyond this machine
    return (
        f"WARNING: listening on {host} with authentication OFF: anyone who can reach this port can read "
        "every study, overwrite labels and roll back models. Set MONAI_LABEL_AUTH_ENABLE=true and "
        "MONAI_LABEL_AUTH_REALM_URI (docs/auth.md), or serve on 127.0.0.1."
    )
