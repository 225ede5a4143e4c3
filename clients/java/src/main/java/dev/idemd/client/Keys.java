package dev.idemd.client;

import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import java.util.UUID;

/**
 * Idempotency keys and request fingerprints, computed the same way in every client language
 * (checked against the shared vectors in {@code clients/testdata/vectors.json}).
 */
public final class Keys {
  private static final UUID URL_NAMESPACE = UUID.fromString("6ba7b811-9dad-11d1-80b4-00c04fd430c8");
  private static final UUID KEY_NAMESPACE = uuidV5(URL_NAMESPACE, "urn:idemd:key");

  private Keys() {}

  /**
   * A deterministic key for an operation on a business entity: UUIDv5 of {@code operation + "\n" +
   * entity} in the namespace UUIDv5(URL, "urn:idemd:key"). Derive keys from the entity (an order id),
   * never from a random value per request.
   */
  public static String entityKey(String entity, String operation) {
    return uuidV5(KEY_NAMESPACE, operation + "\n" + entity).toString();
  }

  /**
   * SHA-256 over the fields sorted by name, each name and value prefixed by its length (u32,
   * big-endian), so field order does not matter and no two requests collide by concatenation. Values
   * are {@code String} (hashed as UTF-8) or {@code byte[]}.
   *
   * @throws InvalidArgumentException for a value of another type
   */
  public static byte[] fingerprint(Map<String, ?> fields) {
    List<byte[][]> encoded = new ArrayList<>(fields.size());
    for (Map.Entry<String, ?> field : fields.entrySet()) {
      Object value = field.getValue();
      byte[] bytes;
      if (value instanceof String text) {
        bytes = text.getBytes(StandardCharsets.UTF_8);
      } else if (value instanceof byte[] raw) {
        bytes = raw;
      } else {
        throw new InvalidArgumentException("fingerprint field '" + field.getKey()
            + "' must be a String or byte[], got " + (value == null ? "null" : value.getClass().getName()), null, null);
      }
      encoded.add(new byte[][] {field.getKey().getBytes(StandardCharsets.UTF_8), bytes});
    }
    // By UTF-8 bytes, which is code point order: Rust's and Python's sort, not String's UTF-16 order.
    encoded.sort((a, b) -> Arrays.compareUnsigned(a[0], b[0]));
    MessageDigest sha256 = digest("SHA-256");
    for (byte[][] field : encoded) {
      for (byte[] part : field) {
        sha256.update(ByteBuffer.allocate(4).putInt(part.length).array());
        sha256.update(part);
      }
    }
    return sha256.digest();
  }

  private static UUID uuidV5(UUID namespace, String name) {
    MessageDigest sha1 = digest("SHA-1");
    sha1.update(ByteBuffer.allocate(16)
        .putLong(namespace.getMostSignificantBits())
        .putLong(namespace.getLeastSignificantBits())
        .array());
    byte[] hash = sha1.digest(name.getBytes(StandardCharsets.UTF_8));
    hash[6] = (byte) ((hash[6] & 0x0f) | 0x50);
    hash[8] = (byte) ((hash[8] & 0x3f) | 0x80);
    ByteBuffer bytes = ByteBuffer.wrap(hash, 0, 16);
    return new UUID(bytes.getLong(), bytes.getLong());
  }

  private static MessageDigest digest(String algorithm) {
    try {
      return MessageDigest.getInstance(algorithm);
    } catch (NoSuchAlgorithmException e) {
      throw new IllegalStateException("every Java platform has " + algorithm, e);
    }
  }
}
