"""API keys: where they come from, how a request's key is checked.

Keys live in a secret, never in the Serve config or the rendered manifests: the
environment variable ``auth.keys_env`` (a ``modal.Secret``, a Kubernetes ``secretKeyRef``)
or the file ``auth.keys_file`` (a mounted Kubernetes Secret; re-read when it changes, so a
rotated or revoked key takes effect without a restart). One key per line, or separated by
commas, each with the name that metrics and logs show instead of the key::

    team-a=sk-live-0123456789
    ci=sha256:8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4

``sha256:<hex>`` stores only the key's SHA-256 (``python -m serve_apps.auth hash KEY``
prints it). A request's key is ``Authorization: Bearer <key>`` (what the ``openai``
client sends) or ``x-api-key``; it is hashed and compared with every stored hash in
constant time (:func:`hmac.compare_digest`), so neither a match's position nor its
prefix shows in the timing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import AuthConfig
from .errors import UnauthorizedError

logger = logging.getLogger(__name__)

HASH_PREFIX = "sha256:"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: bytes  # the digest, 32 bytes


def parse_keys(text: str, source: str) -> list[ApiKey]:
    """``name=key`` / ``name=sha256:<hex>`` entries, one per line or comma-separated;
    blank lines and ``#`` comments are skipped. A malformed entry is a ``ValueError`` that
    names its position, never its content (it may be a key)."""
    keys: list[ApiKey] = []
    entries = [e.strip() for line in text.splitlines() for e in line.split(",")]
    for number, entry in enumerate((e for e in entries if e and not e.startswith("#")), 1):
        name, sep, secret = entry.partition("=")
        name, secret = name.strip(), secret.strip()
        if not sep or not name or not secret:
            raise ValueError(f"{source}: entry {number} is not name=key")
        if secret.startswith(HASH_PREFIX):
            digest = secret[len(HASH_PREFIX) :]
            try:
                raw = bytes.fromhex(digest)
            except ValueError:
                raw = b""
            if len(raw) != 32:
                raise ValueError(f"{source}: entry {number} ({name}) is not a sha256 hex digest")
        else:
            raw = hashlib.sha256(secret.encode()).digest()
        keys.append(ApiKey(name, raw))
    return keys


def bearer_key(authorization: bytes | None, x_api_key: bytes | None) -> str | None:
    """The key a request carries: ``Authorization: Bearer <key>``, else ``x-api-key``."""
    if authorization:
        scheme, _, value = authorization.decode("latin-1").strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if x_api_key:
        return x_api_key.decode("latin-1").strip() or None
    return None


class KeyStore:
    """The keys of ``auth``, loaded from the environment and/or the file.

    The file is checked (one ``stat``) on each lookup and re-read when its modification
    time or size changes; the environment is read once (a new Modal secret or Kubernetes
    env value means a new container anyway).
    """

    def __init__(self, config: AuthConfig, environ: dict[str, str] | None = None):
        self.config = config
        env = os.environ if environ is None else environ
        self._env_keys: list[ApiKey] = []
        if config.keys_env and env.get(config.keys_env):
            self._env_keys = parse_keys(env[config.keys_env], f"${config.keys_env}")
        self._file_keys: list[ApiKey] = []
        self._file_stamp: tuple[float, int] | None = None
        self._refresh()
        if config.enabled and not self.keys():
            where = " or ".join(
                s
                for s in (
                    config.keys_env and f"${config.keys_env}",
                    config.keys_file,
                )
                if s
            )
            raise ValueError(f"auth is enabled but no API keys were found in {where}")

    def _refresh(self) -> None:
        path = self.config.keys_file
        if path is None:
            return
        try:
            st = Path(path).stat()
        except FileNotFoundError:
            stamp = None
        else:
            stamp = (st.st_mtime, st.st_size)
        if stamp == self._file_stamp:
            return
        try:
            keys = parse_keys(Path(path).read_text(), path) if stamp is not None else []
        except ValueError:
            # A half-written file: keep the keys we had, try again on the next request.
            logger.exception("could not read the API keys file; keeping the previous keys")
            return
        self._file_keys, self._file_stamp = keys, stamp

    def keys(self) -> list[ApiKey]:
        return [*self._env_keys, *self._file_keys]

    def authenticate(self, key: str | None) -> str:
        """The name of ``key``; :class:`UnauthorizedError` (401) when it is missing or
        unknown. Every stored digest is compared, whichever matches."""
        if key is None:
            raise UnauthorizedError(
                "no API key: send Authorization: Bearer <key> or x-api-key",
                code="missing_api_key",
            )
        self._refresh()
        digest = hashlib.sha256(key.encode()).digest()
        found: str | None = None
        for stored in self.keys():
            if hmac.compare_digest(digest, stored.sha256) and found is None:
                found = stored.name
        if found is None:
            raise UnauthorizedError("the API key is not valid (wrong, revoked or expired)")
        return found


def main(argv: list[str]) -> int:
    """``python -m serve_apps.auth hash KEY``: the ``sha256:<hex>`` to store instead."""
    if len(argv) != 2 or argv[0] != "hash":
        print("usage: python -m serve_apps.auth hash KEY", file=sys.stderr)
        return 2
    print(HASH_PREFIX + hash_key(argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
