"""The server's secret key: MEDMAAS_SECRET_KEY, else one random key per install kept beside
the SQLite database. It signs session cookies and keys per-tenant secrets derived from it
(the DICOM de-identification seed)."""

from __future__ import annotations

import secrets

from app.config import Settings


def secret_key(settings: Settings) -> str:
    if settings.secret_key:
        return settings.secret_key
    path = settings.home / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()
