"""Keys and fingerprints, computed the same way in every idemd client (checked against
clients/testdata/vectors.json)."""
from __future__ import annotations

import hashlib
import struct
import uuid
from typing import Mapping, Union

__all__ = ["entity_key", "fingerprint"]

_KEY_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:idemd:key")


def entity_key(entity: str, operation: str) -> str:
    """A deterministic key for an operation on an entity (UUIDv5), the same in every client language:
    ``entity_key(order.id, "charge")``, so a retry from any service finds the same record."""
    return str(uuid.uuid5(_KEY_NAMESPACE, f"{operation}\n{entity}"))


def fingerprint(fields: Mapping[str, Union[bytes, str]]) -> bytes:
    """SHA-256 over the fields sorted by name, each name and value prefixed by its u32 big-endian length:
    field order does not matter and no two requests collide by concatenation. Values are bytes, or text
    taken as UTF-8."""
    digest = hashlib.sha256()
    for name in sorted(fields):
        value = fields[name]
        value = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        encoded = name.encode("utf-8")
        digest.update(struct.pack(">I", len(encoded)) + encoded)
        digest.update(struct.pack(">I", len(value)) + value)
    return digest.digest()
