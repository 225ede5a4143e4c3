package dev.idemd.client;

import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.Objects;

/**
 * A stored outcome: what the operation answered (a success, or a {@link Final} failure such as a
 * declined card), replayed byte for byte to every later run of the same key.
 */
public final class Response {
  private final byte[] body;
  private final int code;
  private final String contentType;

  /**
   * @param body the bytes to store and replay
   * @param code an application status, e.g. 201 for a charge, 402 for a declined card
   * @param contentType e.g. {@code application/json}; at most 255 bytes of UTF-8
   * @throws InvalidArgumentException if the content type is too long or not valid UTF-16
   */
  public Response(byte[] body, int code, String contentType) {
    this.body = Objects.requireNonNull(body, "body").clone();
    this.code = code;
    this.contentType = Objects.requireNonNull(contentType, "contentType");
    // Checked here, inside the operation, rather than at Complete: by then the operation has run
    // and a bad response could only be stored as an unknown outcome.
    Validate.text("content type", contentType, 0, 255);
  }

  /** A UTF-8 text body. */
  public static Response ofText(String body, int code, String contentType) {
    return new Response(Objects.requireNonNull(body, "body").getBytes(StandardCharsets.UTF_8), code, contentType);
  }

  /** A copy of the body. */
  public byte[] getBody() {
    return body.clone();
  }

  /** The body decoded as UTF-8. */
  public String getBodyText() {
    return new String(body, StandardCharsets.UTF_8);
  }

  public int getCode() {
    return code;
  }

  public String getContentType() {
    return contentType;
  }

  @Override
  public boolean equals(Object other) {
    return other instanceof Response that
        && code == that.code
        && contentType.equals(that.contentType)
        && Arrays.equals(body, that.body);
  }

  @Override
  public int hashCode() {
    return Objects.hash(code, contentType, Arrays.hashCode(body));
  }

  @Override
  public String toString() {
    return "Response{code=" + code + ", contentType=" + contentType + ", " + body.length + " bytes}";
  }
}
