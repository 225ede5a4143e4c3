package dev.idemd.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.time.Duration;
import java.util.Map;
import java.util.concurrent.atomic.AtomicBoolean;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.function.Executable;

/** Mistakes are found when the client is built or called, before any RPC (no server here). */
class ValidationTest {
  private static final byte[] FINGERPRINT = new byte[32];

  private static void invalid(Executable call) {
    InvalidArgumentException error = assertThrows(InvalidArgumentException.class, call);
    assertEquals(null, error.getStatus(), "found before any call: " + error.getMessage());
  }

  @Test
  void namespacesAndAddressesAreCheckedWhenTheClientIsBuilt() {
    for (String namespace : new String[] {"", "Payments", "pay ments", "a".repeat(65), "payments/eu"}) {
      invalid(() -> IdemdClient.builder("127.0.0.1:50051", namespace));
    }
    for (String address : new String[] {"idemd", "idemd:", "idemd:0", "idemd:70000", "ftp://idemd:50051", "::1:50051", "http://", "a b:1"}) {
      invalid(() -> IdemdClient.builder(address, "payments").build());
    }
    for (String address : new String[] {"idemd:50051", "http://idemd:50051", "https://idemd.example:443/", "[::1]:50051", "10.0.0.1:1"}) {
      IdemdClient.builder(address, "payments").build().close();
    }
    IdemdClient.Builder builder = IdemdClient.builder("127.0.0.1:50051", "payments");
    invalid(() -> builder.leaseTtl(Duration.ofMillis(999)));
    invalid(() -> builder.leaseTtl(Duration.ofHours(2)));
    invalid(() -> builder.waitTimeout(Duration.ofSeconds(61)));
    invalid(() -> builder.retention(Duration.ZERO));
    invalid(() -> builder.rpcRetries(-1));
    invalid(() -> builder.token("two words"));
    invalid(() -> RunOptions.builder().inProgressBudget(Duration.ofSeconds(-1)));
  }

  @Test
  void keysFingerprintsAndResponsesAreCheckedWhenCalled() {
    // Nothing listens there, and no retries: an RPC would show as UnavailableException.
    try (IdemdClient client = IdemdClient.builder("127.0.0.1:1", "payments").rpcRetries(0).build()) {
      AtomicBoolean ran = new AtomicBoolean();
      Operation operation = attempt -> {
        ran.set(true);
        return Response.ofText("ok", 200, "text/plain");
      };
      String[] keys = {"", "a\nb", "tab\there", "del\u007f", "c1\u0085", "x".repeat(256), "é".repeat(128), "lone\uD800surrogate"};
      for (String key : keys) {
        invalid(() -> client.runOnce(key, FINGERPRINT, operation));
      }
      invalid(() -> client.runOnce("order-42", new byte[65], operation));
      assertFalse(ran.get());
      assertThrows(UnavailableException.class, () -> client.runOnce("x".repeat(255), new byte[64], operation));
      assertThrows(UnavailableException.class, () -> client.runOnce("é".repeat(127) + "x", new byte[0], operation));
      assertFalse(ran.get());
    }
    invalid(() -> Response.ofText("{}", 200, "x".repeat(256)));
    invalid(() -> Keys.fingerprint(Map.of("amount", 1000)));
  }

  @Test
  void exceptionsShareOneBaseAndKeepTheirCause() {
    Throwable cause = new RuntimeException("cause");
    IdemdException[] all = {
      new FingerprintMismatchException("m", "k", cause), new LeaseLostException("m", "k", cause),
      new InProgressException("m", "k", cause), new RetryableFailureException("m", "k", cause),
      new OutcomeUnknownFailureException("m", "k", cause), new InvalidArgumentException("m", "k", cause),
      new UnavailableException("m", "k", cause),
    };
    for (IdemdException error : all) {
      assertTrue(error instanceof RuntimeException);
      assertEquals(cause, error.getCause());
      assertEquals("k", error.getKey());
    }
  }
}
