"""The model store: where the trainer writes versions and inference reads them.

Layout under the store root::

    versions/<version>/manifest.json   written last, names every file with its sha256
    versions/<version>/<files...>      the artifacts (ONNX graph, embedding matrix, id lists)
    LIVE                               the version inference should serve

A version folder appears only complete: it is written under ``.tmp-*``, every file is
fsynced, then the folder is renamed into ``versions/``. ``LIVE`` is replaced the same way.
Readers verify every file's sha256 against the manifest before using a version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.signing import SignatureError, sign_manifest, verify_manifest

MANIFEST = "manifest.json"
LIVE_POINTER = "LIVE"


class ArtifactError(Exception):
    """A version in the store is missing, incomplete or does not match its manifest."""


@dataclass(frozen=True)
class StoredVersion:
    """A verified version: its folder and its manifest."""

    version: str
    path: Path
    manifest: dict[str, Any]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_digest(files: dict[str, dict[str, Any]]) -> str:
    """One digest for a whole version: sha256 over the sorted (name, sha256) pairs."""
    lines = "".join(f"{name}\t{files[name]['sha256']}\n" for name in sorted(files))
    return sha256_bytes(lines.encode())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class ModelStore:
    """A local-directory model store."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"

    def ensure(self) -> None:
        self.versions_dir.mkdir(parents=True, exist_ok=True)

    # -- writing (trainer) -------------------------------------------------------------
    def write_version(
        self,
        version: str,
        files: dict[str, bytes],
        manifest: dict[str, Any],
        signing_key: Ed25519PrivateKey | None = None,
    ) -> StoredVersion:
        """Writes a complete version atomically; the manifest gains ``files``, ``sha256`` and,
        with a signing key, an Ed25519 ``signature`` over all of it."""
        self.ensure()
        final = self.versions_dir / version
        if final.exists():
            raise FileExistsError(f"model version {version} already exists in {self.versions_dir}")
        entries = {name: {"sha256": sha256_bytes(data), "bytes": len(data)} for name, data in files.items()}
        full_manifest = {**manifest, "version": version, "files": entries, "sha256": artifact_digest(entries)}
        if signing_key is not None:
            full_manifest["signature"] = sign_manifest(full_manifest, signing_key)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=self.root))
        try:
            for name, data in files.items():
                _write_synced(tmp / name, data)
            _write_synced(tmp / MANIFEST, json.dumps(full_manifest, indent=2, sort_keys=True).encode())
            fsync_dir(tmp)
            os.rename(tmp, final)
            fsync_dir(self.versions_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return StoredVersion(version=version, path=final, manifest=full_manifest)

    def set_live(self, version: str) -> None:
        """Points ``LIVE`` at a stored version, atomically."""
        if not (self.versions_dir / version / MANIFEST).is_file():
            raise ArtifactError(f"cannot make {version} live: it is not in the store")
        self.ensure()
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-live-", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(version.encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, self.root / LIVE_POINTER)
            fsync_dir(self.root)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def remove_version(self, version: str) -> None:
        shutil.rmtree(self.versions_dir / version, ignore_errors=True)

    def clean_temporaries(self) -> None:
        """Removes leftovers of writes interrupted by a crash."""
        if self.root.is_dir():
            for leftover in self.root.glob(".tmp-*"):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)

    # -- reading (inference) -----------------------------------------------------------
    def live_version(self) -> str | None:
        try:
            text = (self.root / LIVE_POINTER).read_text().strip()
        except FileNotFoundError:
            return None
        return text or None

    def list_versions(self) -> list[str]:
        """Complete versions (those with a manifest), oldest first."""
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir() if (p / MANIFEST).is_file())

    def read_manifest(self, version: str) -> dict[str, Any]:
        path = self.versions_dir / version / MANIFEST
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise ArtifactError(f"version {version}: no manifest at {path}") from exc
        return self.parse_manifest(version, data)

    @staticmethod
    def parse_manifest(version: str, data: bytes) -> dict[str, Any]:
        try:
            manifest = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"version {version}: manifest is not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ArtifactError(f"version {version}: manifest lists no files")
        return manifest

    def open_verified(
        self, version: str, expected_sha256: str | None = None, public_key: Ed25519PublicKey | None = None
    ) -> StoredVersion:
        """Reads the manifest, checks its signature (when a public key is given), then every file's
        size and sha256; ArtifactError on any mismatch."""
        manifest = self.read_manifest(version)
        if public_key is not None:
            try:
                verify_manifest(manifest, public_key)
            except SignatureError as exc:
                raise ArtifactError(f"version {version}: {exc}") from exc
        files: dict[str, dict[str, Any]] = manifest["files"]
        if manifest.get("sha256") != artifact_digest(files):
            raise ArtifactError(f"version {version}: manifest digest does not match its file list")
        if expected_sha256 and manifest["sha256"] != expected_sha256:
            raise ArtifactError(
                f"version {version}: digest {manifest['sha256'][:12]} differs from the announced "
                f"{expected_sha256[:12]}"
            )
        folder = self.versions_dir / version
        for name, entry in files.items():
            path = folder / name
            if not path.is_file():
                raise ArtifactError(f"version {version}: file {name} is missing")
            if path.stat().st_size != entry.get("bytes"):
                raise ArtifactError(
                    f"version {version}: {name} has {path.stat().st_size} bytes, "
                    f"manifest says {entry.get('bytes')}"
                )
            if sha256_file(path) != entry.get("sha256"):
                raise ArtifactError(f"version {version}: {name} does not match its sha256")
        return StoredVersion(version=version, path=folder, manifest=manifest)
