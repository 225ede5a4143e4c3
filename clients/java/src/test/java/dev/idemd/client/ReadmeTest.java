package dev.idemd.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.net.SocketTimeoutException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.stream.Collectors;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.condition.EnabledIf;

/** The README's Java example, run against a real idemd and a fake provider; the README shows it verbatim. */
class ReadmeTest {
  record Order(String id, String amount, String currency) {}

  record Charge(String id, String amount) {
    String toJson() {
      return "{\"id\":\"" + id + "\",\"amount\":" + amount + "}";
    }
  }

  static final class CardDeclinedException extends Exception {
    private static final long serialVersionUID = 1L;

    CardDeclinedException(String message) {
      super(message);
    }

    String toJson() {
      return "{\"error\":\"" + getMessage() + "\"}";
    }
  }

  /** Deduplicates by idempotency key like Stripe; declines amounts over 5000; the first call times out after charging. */
  static final class Provider {
    final Map<String, Charge> charges = new ConcurrentHashMap<>();
    final AtomicInteger calls = new AtomicInteger();

    Charge charge(Order order, String idempotencyKey) throws IOException, CardDeclinedException {
      if (Integer.parseInt(order.amount()) > 5000) {
        throw new CardDeclinedException("card_declined");
      }
      Charge charge = charges.computeIfAbsent(idempotencyKey, key -> new Charge("ch_" + charges.size(), order.amount()));
      if (calls.incrementAndGet() == 1) {
        throw new SocketTimeoutException("read timed out");
      }
      return charge;
    }
  }

  static Response charge(String address, Order order, Provider provider) throws CardDeclinedException {
    // README:begin example
    try (IdemdClient idemd = IdemdClient.builder(address, "payments").build()) {
      String key = Keys.entityKey(order.id(), "charge");
      byte[] fingerprint = Keys.fingerprint(Map.of("amount", order.amount(), "currency", order.currency()));
      Done done = idemd.runOnce(key, fingerprint, attempt -> {
        try {
          // The provider's idempotency key: a retry after a crash cannot charge twice.
          Charge charge = provider.charge(order, attempt.getDownstreamKey());
          return Response.ofText(charge.toJson(), 201, "application/json");
        } catch (CardDeclinedException e) { // an answer: stored, replayed to every retry
          throw new Final(Response.ofText(e.toJson(), 402, "application/json"), e);
        } catch (SocketTimeoutException e) { // sent, no answer: it may have charged
          throw new OutcomeUnknown(e);
        } catch (IOException e) { // refused, 5xx: nothing happened
          throw new Retryable(e);
        }
      });
      // The same for every retry of this order; a decline is the same exception every time.
      return done.responseOrThrow(code -> code == 402, r -> new CardDeclinedException(r.getBodyText()));
    }
    // README:end
  }

  /** Does not deduplicate: a second charge call charges again; finds charges by their metadata. */
  static final class PlainProvider {
    final Map<String, Charge> byIdempotencyKey = new ConcurrentHashMap<>();
    final AtomicInteger charges = new AtomicInteger();

    Charge charge(Order order, String idempotencyKey) {
      Charge charge = new Charge("ch_" + charges.incrementAndGet(), order.amount());
      byIdempotencyKey.put(idempotencyKey, charge);
      return charge;
    }

    Optional<Charge> findByMetadata(String name, String value) {
      return Optional.ofNullable(byIdempotencyKey.get(value));
    }
  }

  static Done chargeWithReconcile(IdemdClient idemd, String key, byte[] fingerprint, Order order, PlainProvider provider,
      Operation charge) {
    // README:begin reconcile
    RunOptions options = RunOptions.builder()
        .reconcile(attempt -> provider.findByMetadata("idempotency_key", attempt.getDownstreamKey())
            .map(found -> Response.ofText(found.toJson(), 201, "application/json"))
            .orElse(null))
        .build();
    Done done = idemd.runOnce(key, fingerprint, options, charge);
    // README:end
    return done;
  }

  @Test
  @EnabledIf(value = "dev.idemd.client.IdemdServer#available", disabledReason = "IDEMD_BIN is not set")
  void theReadmeExampleChargesOnce() throws Exception {
    try (IdemdServer server = IdemdServer.start()) {
      chargesOnce(server);
      reconciles(server);
    }
  }

  private static void reconciles(IdemdServer server) {
    PlainProvider provider = new PlainProvider();
    Order order = new Order(IdemdServer.freshKey("order"), "1000", "EUR");
    String key = Keys.entityKey(order.id(), "charge");
    byte[] fingerprint = Keys.fingerprint(Map.of("amount", order.amount(), "currency", order.currency()));
    try (IdemdClient idemd = IdemdClient.builder(server.address, "payments").build()) {
      // Charged, then the answer was lost.
      assertThrows(OutcomeUnknownFailureException.class, () -> chargeWithReconcile(idemd, key, fingerprint, order, provider,
          attempt -> {
            provider.charge(order, attempt.getDownstreamKey());
            throw new OutcomeUnknown("read timed out");
          }));
      Done done = chargeWithReconcile(idemd, key, fingerprint, order, provider,
          attempt -> Response.ofText(provider.charge(order, attempt.getDownstreamKey()).toJson(), 201, "application/json"));
      assertTrue(done.isReconciled());
      assertEquals(1, provider.charges.get());
      assertEquals("{\"id\":\"ch_1\",\"amount\":1000}", done.getResponse().getBodyText());
    }
  }

  private static void chargesOnce(IdemdServer server) throws Exception {
    Provider provider = new Provider();
    Order order = new Order(IdemdServer.freshKey("order"), "1000", "EUR");
    // The first call times out after the provider charged; the caller's retry gets the same charge.
    assertThrows(OutcomeUnknownFailureException.class, () -> charge(server.address, order, provider));
    Response first = charge(server.address, order, provider);
    Response again = charge(server.address, order, provider);
    assertEquals(201, first.getCode());
    assertEquals(first, again);
    assertEquals(1, provider.charges.size());
    assertEquals(2, provider.calls.get());

    Order tooMuch = new Order(IdemdServer.freshKey("order"), "9999", "EUR");
    for (int run = 0; run < 2; run++) {
      CardDeclinedException declined = assertThrows(CardDeclinedException.class, () -> charge(server.address, tooMuch, provider));
      assertEquals("{\"error\":\"card_declined\"}", declined.getMessage());
    }
  }

  @Test
  void theReadmeShowsTheExamplesVerbatim() throws IOException {
    List<String> source = Files.readAllLines(Path.of("src/test/java/dev/idemd/client/ReadmeTest.java"), StandardCharsets.UTF_8);
    String readme = Files.readString(Path.of("README.md"), StandardCharsets.UTF_8);
    int examples = 0;
    for (int begin = 0; begin < source.size(); begin++) {
      if (!source.get(begin).startsWith("    // README:begin ")) {
        continue;
      }
      int end = begin + 1;
      while (!source.get(end).equals("    // README:end")) {
        end++;
      }
      String expected = source.subList(begin + 1, end).stream()
          .map(line -> line.length() >= 4 ? line.substring(4) : line)
          .collect(Collectors.joining("\n"));
      assertTrue(readme.contains("```java\n" + expected + "\n```"), "README.md must show this verbatim:\n" + expected);
      examples++;
    }
    assertEquals(2, examples);
  }
}
