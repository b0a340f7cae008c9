"""Who may change things through the dashboard: admin users from files, sessions and CSRF tokens.

Reading needs no login (the pages show no patient identifiers unless configured). Admin actions
(reprocess, retry, cancel, acknowledge) need a user, either

- signed in with a password whose argon2 hash is in ``http.admin_password_file`` (lines
  ``user:$argon2id$...``), the session kept in a signed cookie (SameSite=Strict), every form
  carrying the session's CSRF token; or
- a bearer token from ``http.admin_token_file`` (lines ``user:TOKEN``, or one bare token for the
  user "token") in ``Authorization: Bearer TOKEN``: not sent by browsers on their own, so no CSRF.

With neither file configured, admin actions are refused: safe by default.

``python -m pacs_agent.node.web.auth hash-password [USER]`` prints a password-file line.
"""

from __future__ import annotations

import getpass
import hmac
import secrets
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from pacs_agent.errors import ConfigError

#: Session keys.
SESSION_USER = "user"
SESSION_CSRF = "csrf"
#: Form field and header that carry the CSRF token.
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
TOKEN_USER = "token"
_USER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")
#: A hash every unknown user is checked against, so a wrong user name takes as long as a wrong password.
_HASHER = PasswordHasher()
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


def _valid_user(name: str) -> bool:
    return 0 < len(name) <= 64 and set(name) <= _USER_CHARS


def _lines(path: str, what: str) -> list[tuple[int, str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.strip().startswith("#")]


@dataclass(frozen=True)
class AdminCredentials:
    """The admin users: password hashes by user and users by token."""

    password_hashes: Mapping[str, str] = field(default_factory=dict)
    tokens: Mapping[str, str] = field(default_factory=dict)  # token -> user

    @property
    def configured(self) -> bool:
        return bool(self.password_hashes or self.tokens)

    @property
    def passwords_enabled(self) -> bool:
        return bool(self.password_hashes)

    @classmethod
    def from_files(cls, password_file: str = "", token_file: str = "") -> AdminCredentials:
        """Read both files (either may be ""); ConfigError names the file and line of a bad entry."""
        hashes: dict[str, str] = {}
        if password_file:
            for number, line in _lines(password_file, "http.admin_password_file"):
                user, sep, hashed = line.partition(":")
                if not sep or not _valid_user(user) or not hashed.startswith("$argon2"):
                    raise ConfigError(
                        f"http.admin_password_file {password_file} line {number}: expected user:$argon2id$... "
                        "(make one with `python -m pacs_agent.node.web.auth hash-password USER`)"
                    )
                hashes[user] = hashed
            if not hashes:
                raise ConfigError(f"http.admin_password_file {password_file} has no user")
        tokens: dict[str, str] = {}
        if token_file:
            entries = _lines(token_file, "http.admin_token_file")
            for number, line in entries:
                user, sep, token = line.partition(":")
                if not sep:
                    if len(entries) > 1:
                        raise ConfigError(f"http.admin_token_file {token_file} line {number}: expected user:TOKEN")
                    user, token = TOKEN_USER, line
                if not _valid_user(user) or len(token) < 16:
                    raise ConfigError(
                        f"http.admin_token_file {token_file} line {number}: a user name and a token of at least 16 characters"
                    )
                tokens[token] = user
            if not tokens:
                raise ConfigError(f"http.admin_token_file {token_file} has no token")
        return cls(password_hashes=hashes, tokens=tokens)

    def check_password(self, user: str, password: str) -> bool:
        """Whether ``password`` is the user's (argon2; unknown users cost the same time)."""
        hashed = self.password_hashes.get(user)
        try:
            return _HASHER.verify(hashed or _DUMMY_HASH, password) and hashed is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def user_for_token(self, token: str) -> str | None:
        """The user a bearer token belongs to, compared in constant time against every token."""
        found = None
        for known, user in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = user
        return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_matches(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected).encode(), str(given).encode())


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def main(argv: Sequence[str] | None = None) -> int:
    """``hash-password [USER]``: read a password twice from the terminal, print ``user:hash``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "hash-password" or len(args) > 2:
        print("usage: python -m pacs_agent.node.web.auth hash-password [USER]", file=sys.stderr)
        return 2
    user = args[1] if len(args) == 2 else "admin"
    if not _valid_user(user):
        print(f"user name {user!r}: letters, digits and . _ - @ only", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        print("a password needs at least 8 characters", file=sys.stderr)
        return 1
    print(f"{user}:{hash_password(password)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
