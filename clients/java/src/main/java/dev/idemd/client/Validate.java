package dev.idemd.client;

import java.nio.charset.StandardCharsets;
import java.time.Duration;

/** idemd's field rules (API.md), checked before a call so a mistake is not a raw gRPC error. */
final class Validate {
  private Validate() {}

  static String namespace(String namespace) {
    if (namespace == null || namespace.isEmpty() || namespace.length() > 64
        || !namespace.chars().allMatch(c -> (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-')) {
      throw new InvalidArgumentException(
          "namespace must be 1-64 characters of [a-z0-9._-], got " + quote(namespace), null, null);
    }
    return namespace;
  }

  static String key(String key) {
    if (key == null) {
      throw new InvalidArgumentException("key must not be null", null, null);
    }
    text("key", key, 1, 255);
    for (int i = 0; i < key.length(); i++) {
      char c = key.charAt(i);
      if (c <= 0x1f || (c >= 0x7f && c <= 0x9f)) {
        throw new InvalidArgumentException(
            "key must not contain control characters (U+" + String.format("%04X", (int) c) + " at index " + i + ")",
            key, null);
      }
    }
    return key;
  }

  static byte[] fingerprint(byte[] fingerprint) {
    if (fingerprint == null || fingerprint.length > 64) {
      throw new InvalidArgumentException("fingerprint must be 0-64 bytes (e.g. a SHA-256), got "
          + (fingerprint == null ? "null" : fingerprint.length + " bytes"), null, null);
    }
    return fingerprint;
  }

  /**
   * Text idemd stores as UTF-8, {@code min}-{@code max} bytes. A lone surrogate would silently be
   * sent as '?', which for a key would be another key.
   */
  static void text(String field, String value, int min, int max) {
    for (int i = 0; i < value.length(); i++) {
      char c = value.charAt(i);
      if (Character.isHighSurrogate(c) && i + 1 < value.length() && Character.isLowSurrogate(value.charAt(i + 1))) {
        i++;
      } else if (Character.isSurrogate(c)) {
        throw new InvalidArgumentException(field + " has an unpaired surrogate at index " + i + " (not UTF-8 text)", null, null);
      }
    }
    int bytes = value.getBytes(StandardCharsets.UTF_8).length;
    if (bytes < min || bytes > max) {
      throw new InvalidArgumentException(field + " must be " + min + "-" + max + " bytes of UTF-8, got " + bytes, null, null);
    }
  }

  static Duration between(String field, Duration value, Duration min, Duration max) {
    if (value == null || value.compareTo(min) < 0 || value.compareTo(max) > 0) {
      throw new InvalidArgumentException(field + " must be between " + min + " and " + max + ", got " + value, null, null);
    }
    return value;
  }

  static Duration positive(String field, Duration value) {
    if (value == null || value.isNegative() || value.isZero()) {
      throw new InvalidArgumentException(field + " must be positive, got " + value, null, null);
    }
    return value;
  }

  static Duration notNegative(String field, Duration value) {
    if (value == null || value.isNegative()) {
      throw new InvalidArgumentException(field + " must not be negative, got " + value, null, null);
    }
    return value;
  }

  static String quote(String value) {
    return value == null ? "null" : "'" + value + "'";
  }
}
