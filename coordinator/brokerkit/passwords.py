"""mosquitto 2.0 password-file entries, made without ``mosquitto_passwd``.

mosquitto 2.0 stores ``username:$7$<iterations>$<salt>$<hash>``: PBKDF2-HMAC-SHA512 (RFC 8018)
over the password with a 12-byte random salt, 101 iterations by default, the 64-byte digest and
the salt both in standard base64 (mosquitto's ``src/password_mosq.c``). Usernames cannot hold
``:`` (the separator) and, since agent ids are usernames, follow the agent id rules.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

from agent.protocol.topics import check_segment

ITERATIONS = 101
"""mosquitto_passwd's default (``PW_DEFAULT_ITERATIONS``)."""
SALT_BYTES = 12


def new_password() -> str:
    """A random password that is also safe inside a URL (``mqtts://user:password@host``)."""
    return secrets.token_urlsafe(24)


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """The ``$7$`` hash mosquitto 2.0 checks ``password`` against."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (as mosquitto would decide)."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt, digest = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    except ValueError:
        return False
    mine = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return hmac.compare_digest(mine, digest)


def check_username(username: str) -> str:
    """A username usable in the password file and in ACL patterns (``%u`` becomes a topic
    level, so the topic-segment rules apply; ``:`` separates the password file's fields)."""
    check_segment(username, "username")
    if ":" in username or any(c.isspace() for c in username):
        raise ValueError(f"username: {username!r} may not contain ':' or white space")
    return username


def render_password_file(entries: dict[str, str]) -> str:
    """``username:hash`` lines, sorted, from ``{username: $7$ hash}``."""
    return "".join(f"{check_username(user)}:{entries[user]}\n" for user in sorted(entries))


def parse_password_file(text: str) -> dict[str, str]:
    """``{username: hash}`` from a mosquitto password file (blank lines and # comments skipped)."""
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if not sep or not encoded.startswith("$"):
            raise ValueError(f"password file line {number}: expected username:$7$...")
        entries[user] = encoded
    return entries
