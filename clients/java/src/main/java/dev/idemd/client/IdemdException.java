package dev.idemd.client;

import com.google.rpc.ErrorInfo;
import io.grpc.Status;
import io.grpc.StatusException;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import org.jspecify.annotations.Nullable;

/**
 * The base of everything {@link IdemdClient} throws. Thrown as itself when idemd answered an error no
 * subclass stands for (PERMISSION_DENIED, UNAUTHENTICATED, …). The gRPC status and idemd's
 * {@code ErrorInfo} reason are kept when the error came from idemd, and the cause always.
 */
public class IdemdException extends RuntimeException {
  private static final long serialVersionUID = 1L;
  private final @Nullable String key;
  private final transient @Nullable Status status;
  private final @Nullable String reason;

  public IdemdException(String message, @Nullable String key, @Nullable Throwable cause) {
    super(message, cause);
    this.key = key;
    Throwable rpc = rpcError(cause);
    this.status = rpc == null ? null : Status.fromThrowable(rpc);
    this.reason = rpc == null ? null : reasonOf(rpc);
  }

  /** The idempotency key of the call, when there was one. */
  public @Nullable String getKey() {
    return key;
  }

  /** The gRPC status idemd answered, when this came from an RPC (also through a cause). */
  public @Nullable Status getStatus() {
    return status;
  }

  /** idemd's {@code google.rpc.ErrorInfo} reason ({@code FINGERPRINT_MISMATCH}, {@code LEASE_LOST}, …). */
  public @Nullable String getReason() {
    return reason;
  }

  private static @Nullable Throwable rpcError(@Nullable Throwable error) {
    for (Throwable at = error; at != null; at = at.getCause()) {
      if (at instanceof StatusRuntimeException || at instanceof StatusException) {
        return at;
      }
    }
    return null;
  }

  /** The {@code ErrorInfo} reason idemd attached to a gRPC error, if any. */
  static @Nullable String reasonOf(Throwable rpcError) {
    com.google.rpc.Status status = StatusProto.fromThrowable(rpcError);
    if (status == null) {
      return null;
    }
    for (com.google.protobuf.Any detail : status.getDetailsList()) {
      if (detail.is(ErrorInfo.class)) {
        try {
          return detail.unpack(ErrorInfo.class).getReason();
        } catch (com.google.protobuf.InvalidProtocolBufferException e) {
          return null;
        }
      }
    }
    return null;
  }
}
