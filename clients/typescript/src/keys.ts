// Keys and fingerprints, computed the same way in every client language and
// checked against clients/testdata/vectors.json.
import { createHash } from "crypto";

/** RFC 4122's namespace for URLs. */
const URL_NAMESPACE = Buffer.from("6ba7b8119dad11d180b400c04fd430c8", "hex");

function uuidV5(namespace: Buffer, name: string): Buffer {
  const hash = createHash("sha1").update(namespace).update(name, "utf8").digest().subarray(0, 16);
  hash[6] = (hash[6] & 0x0f) | 0x50;
  hash[8] = (hash[8] & 0x3f) | 0x80;
  return hash;
}

/** UUIDv5(URL, "urn:idemd:key"): every client language derives keys under it, so they agree on an entity's key. */
const KEY_NAMESPACE = uuidV5(URL_NAMESPACE, "urn:idemd:key");

/**
 * The idempotency key of an operation on a business entity
 * (`entityKey(order.id, "charge")`): a UUIDv5, the same in every client
 * language, so a retry from any service finds the same record.
 */
export function entityKey(entity: string, operation: string): string {
  const hex = uuidV5(KEY_NAMESPACE, `${operation}\n${entity}`).toString("hex");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/**
 * SHA-256 over the request's named fields sorted by name, each name and value
 * prefixed by its length (u32, big-endian): field order does not matter, and
 * no two different requests collide by concatenation. Values are strings
 * (their UTF-8 bytes) or bytes.
 */
export function fingerprint(fields: Record<string, string | Uint8Array>): Buffer {
  const hash = createHash("sha256");
  const length = Buffer.alloc(4);
  // By UTF-8 bytes, as every other client sorts: UTF-16 order differs above U+FFFF.
  const names = Object.keys(fields).sort((a, b) => Buffer.compare(Buffer.from(a, "utf8"), Buffer.from(b, "utf8")));
  for (const name of names) {
    const value = fields[name];
    if (typeof value !== "string" && !(value instanceof Uint8Array)) {
      throw new TypeError(`fingerprint: field ${JSON.stringify(name)} must be a string or a Uint8Array/Buffer, got ${typeof value}`);
    }
    for (const part of [Buffer.from(name, "utf8"), typeof value === "string" ? Buffer.from(value, "utf8") : value]) {
      length.writeUInt32BE(part.byteLength);
      hash.update(length).update(part);
    }
  }
  return hash.digest();
}
