"""Ed25519 signatures of model manifests: the trainer signs, inference verifies.

The signature covers the whole manifest except the signature itself (canonical JSON), and the
manifest holds every artifact file's sha256, so a changed file, a changed manifest or a key
that is not the configured one all fail verification before any model code runs.

``python -m shared.signing keygen DIR`` writes a new key pair: ``signing.key`` (private, for
the trainer, mode 0600) and ``signing.pub`` (public, for every inference replica).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "ed25519"


class SignatureError(Exception):
    """A manifest is unsigned, signed by another key, or altered after signing."""


def canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_manifest(manifest: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, str]:
    """The ``signature`` entry for a manifest."""
    return {
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "value": base64.b64encode(private_key.sign(canonical(manifest))).decode(),
    }


def verify_manifest(manifest: dict[str, Any], public_key: Ed25519PublicKey) -> None:
    signature = manifest.get("signature")
    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM:
        raise SignatureError("the manifest carries no ed25519 signature")
    if signature.get("key_id") != key_id(public_key):
        raise SignatureError(
            f"signed by key {signature.get('key_id')!r}, not the configured {key_id(public_key)}"
        )
    try:
        public_key.verify(base64.b64decode(str(signature.get("value", ""))), canonical(manifest))
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError("the signature does not match the manifest (altered after signing?)") from exc


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def generate_keypair(folder: Path) -> tuple[Path, Path]:
    """Writes ``signing.key`` (0600) and ``signing.pub`` into ``folder``; refuses to overwrite."""
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / "signing.key", folder / "signing.pub"
    if private_path.exists() or public_path.exists():
        raise FileExistsError(f"{folder} already holds a key pair; remove it first or choose another folder")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.signing", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    keygen = verbs.add_parser("keygen", help="write a new Ed25519 key pair (signing.key, signing.pub)")
    keygen.add_argument("folder", type=Path)
    args = parser.parse_args()
    try:
        private_path, public_path = generate_keypair(args.folder)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"private key (trainer: FRESHREC_SIGNING_KEY_FILE): {private_path}")
    print(f"public key (inference: FRESHREC_VERIFY_KEY_FILE): {public_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
