# Token mode: who a connection is and which documents it may use, from an
# HS256 JWT (PyJWT does the verifying). Tokens are secrets: nothing here logs one.

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import jwt

ALGORITHM = "HS256"
ALL_DOCUMENTS = "*"


class AuthError(Exception):
    """A handshake without a valid token; the message is safe to show the client."""


MODERATOR = "moderator"  # the role that may edit and delete anyone's messages and update anyone's session


class Identity:
    """An authenticated user, the documents the token grants (None: all), and whether they moderate."""

    __slots__ = ("user", "documents", "moderator")

    def __init__(self, user: str, documents: frozenset[str] | None, moderator: bool = False):
        self.user = user
        self.documents = documents
        self.moderator = moderator


def bearer_token(query: Mapping[str, list[str]], headers: Mapping[str, str]) -> str | None:
    """The token from `?token=` (browsers) or `Authorization: Bearer` (everyone else)."""
    if "token" in query:
        return query["token"][0]
    authorization = headers.get("Authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def authenticate(token: str | None, secret: str, valid_user) -> Identity:
    if not token:
        raise AuthError("a token is required")
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["sub"]})
    except jwt.ExpiredSignatureError:
        raise AuthError("the token has expired") from None
    except jwt.InvalidTokenError:
        raise AuthError("the token is not valid") from None
    user = claims["sub"]
    if not isinstance(user, str) or not valid_user(user):
        raise AuthError("the token's sub must be 1-64 printable characters")
    roles = claims.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise AuthError("the token's roles claim must be a list of strings")
    documents = claims.get("docs")
    if documents is None:
        return Identity(user, None, MODERATOR in roles)
    if not isinstance(documents, list) or not all(isinstance(d, str) for d in documents):
        raise AuthError("the token's docs claim must be a list of document ids")
    return Identity(user, None if ALL_DOCUMENTS in documents else frozenset(documents), MODERATOR in roles)


def mint_token(
    secret: str, sub: str, docs: Iterable[str] | None = None, ttl_s: float | None = 3600, roles: Iterable[str] = ()
) -> str:
    """A token for development and tests (`sectionchat token`)."""
    claims: dict[str, object] = {"sub": sub, "iat": int(time.time())}
    if ttl_s is not None:
        claims["exp"] = int(time.time() + ttl_s)
    if docs is not None:
        claims["docs"] = list(docs)
    if roles:
        claims["roles"] = list(roles)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
