package dev.idemd.client;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertSame;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.idemd.v1.AbortedBy;
import dev.idemd.v1.BeginRequest;
import dev.idemd.v1.BeginResponse;
import dev.idemd.v1.EventKind;
import dev.idemd.v1.IdempotencyGrpc;
import dev.idemd.v1.Record;
import dev.idemd.v1.ReleaseRequest;
import dev.idemd.v1.State;
import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptor;
import io.grpc.ClientInterceptors;
import io.grpc.ForwardingClientCall;
import io.grpc.ForwardingClientCallListener;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.Status;
import java.net.SocketTimeoutException;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicReference;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.condition.EnabledIf;

/**
 * One test per scenario of clients/testdata/conformance.json (the vectors scenario is in
 * {@link VectorsTest}), against a real idemd.
 */
@EnabledIf(value = "dev.idemd.client.IdemdServer#available", disabledReason = "IDEMD_BIN is not set")
class ConformanceTest {
  private static final String NAMESPACE = "payments";
  private static final byte[] FINGERPRINT = Keys.fingerprint(Map.of("amount", "1000", "currency", "EUR"));
  private static IdemdServer server;
  private static IdemdClient client;

  @BeforeAll
  static void start() throws Exception {
    server = IdemdServer.start();
    client = server.client(NAMESPACE).build();
  }

  @AfterAll
  static void stop() throws Exception {
    if (client != null) {
      client.close();
    }
    if (server != null) {
      server.close();
    }
  }

  private static Operation answering(AtomicInteger runs, String body) {
    return attempt -> {
      runs.incrementAndGet();
      return Response.ofText(body, 201, "application/json");
    };
  }

  @Test
  void firstRunStoresAndReplays() {
    String key = IdemdServer.freshKey("first-run");
    AtomicInteger runs = new AtomicInteger();
    AtomicReference<String> downstreamKey = new AtomicReference<>();
    Operation charge = attempt -> {
      runs.incrementAndGet();
      downstreamKey.set(attempt.getDownstreamKey());
      assertEquals(1, attempt.getAttempt());
      assertNull(attempt.getPrevious());
      return Response.ofText("{\"charge\":\"ch_1\"}", 201, "application/json");
    };

    Done first = client.runOnce(key, FINGERPRINT, charge);
    Done second = client.runOnce(key, FINGERPRINT, charge);

    assertEquals(1, runs.get());
    assertFalse(first.isReplayed());
    assertTrue(second.isReplayed());
    assertEquals(Response.ofText("{\"charge\":\"ch_1\"}", 201, "application/json"), first.getResponse());
    assertEquals(first.getResponse(), second.getResponse());
    assertEquals(1, second.getAttempt());
    assertTrue(downstreamKey.get().matches("idk_[0-9a-f]{32}"), downstreamKey.get());
    Record record = server.lookup(NAMESPACE, key);
    assertEquals(State.STATE_COMPLETED, record.getState());
    assertEquals(downstreamKey.get(), record.getDownstreamKey());
  }

  @Test
  void concurrentDuplicateWaitsForTheStoredResponse() throws Exception {
    String key = IdemdServer.freshKey("duplicate");
    AtomicInteger runs = new AtomicInteger();
    CountDownLatch holding = new CountDownLatch(1);
    CountDownLatch finish = new CountDownLatch(1);
    CompletableFuture<Done> holder = client.runOnceAsync(key, FINGERPRINT, attempt -> {
      runs.incrementAndGet();
      holding.countDown();
      assertTrue(finish.await(20, TimeUnit.SECONDS));
      return Response.ofText("holder", 201, "text/plain");
    });
    assertTrue(holding.await(10, TimeUnit.SECONDS));

    CompletableFuture<Done> duplicate = client.runOnceAsync(key, FINGERPRINT, answering(runs, "duplicate"));
    Thread.sleep(500);
    assertFalse(duplicate.isDone(), "the duplicate must wait while the holder runs");
    finish.countDown();

    Done waited = duplicate.get(20, TimeUnit.SECONDS);
    Done held = holder.get(20, TimeUnit.SECONDS);
    assertEquals(1, runs.get());
    assertFalse(held.isReplayed());
    assertTrue(waited.isReplayed());
    assertEquals("holder", waited.getResponse().getBodyText());
    assertEquals(held.getResponse(), waited.getResponse());
  }

  /** How a caller turns a stored decline back into its own exception, first run or replay. */
  static final class CardDeclined extends RuntimeException {
    private static final long serialVersionUID = 1L;

    CardDeclined(String message) {
      super(message);
    }
  }

  @Test
  void finalFailureIsStoredAndReplayed() {
    String key = IdemdServer.freshKey("final");
    AtomicInteger runs = new AtomicInteger();
    Response declined = Response.ofText("{\"error\":\"card_declined\"}", 402, "application/json");
    Operation charge = attempt -> {
      runs.incrementAndGet();
      throw new Final(declined, new IllegalStateException("provider said: card declined"));
    };

    Done first = client.runOnce(key, FINGERPRINT, charge);
    Done again = client.runOnce(key, FINGERPRINT, charge);

    assertEquals(1, runs.get());
    assertFalse(first.isReplayed());
    assertTrue(again.isReplayed());
    assertEquals(declined, first.getResponse());
    assertEquals(declined, again.getResponse());
    for (Done done : List.of(first, again)) {
      CardDeclined thrown = assertThrows(CardDeclined.class,
          () -> done.responseOrThrow(code -> code == 402, response -> new CardDeclined(response.getBodyText())));
      assertEquals("{\"error\":\"card_declined\"}", thrown.getMessage());
    }
    Record record = server.lookup(NAMESPACE, key);
    assertEquals(State.STATE_COMPLETED, record.getState());
    assertEquals(402, record.getResponseCode());
  }

  @Test
  void retryableFailureIsAbortedAndRerun() {
    String key = IdemdServer.freshKey("retryable");
    Retryable refused = new Retryable("503 from the provider");
    AtomicReference<String> firstKey = new AtomicReference<>();
    RetryableFailureException failure = assertThrows(RetryableFailureException.class,
        () -> client.runOnce(key, FINGERPRINT, attempt -> {
          firstKey.set(attempt.getDownstreamKey());
          throw refused;
        }));
    assertSame(refused, failure.getCause());
    assertEquals(key, failure.getKey());
    Record aborted = server.lookup(NAMESPACE, key);
    assertEquals(State.STATE_ABORTED, aborted.getState());
    assertFalse(aborted.getOutcomeUnknown());

    AtomicInteger runs = new AtomicInteger();
    Done done = client.runOnce(key, FINGERPRINT, attempt -> {
      runs.incrementAndGet();
      assertEquals(2, attempt.getAttempt());
      assertEquals(firstKey.get(), attempt.getDownstreamKey());
      PreviousAttempt previous = attempt.getPrevious();
      assertNotNull(previous);
      assertEquals(1, previous.getAttempt());
      assertEquals(AbortedBy.ABORTED_BY_CALLER, previous.getAbortedBy());
      assertFalse(previous.isOutcomeUnknown());
      assertNotNull(previous.getEndedAt());
      return Response.ofText("charged", 201, "text/plain");
    });
    assertEquals(1, runs.get());
    assertEquals(2, done.getAttempt());
    assertFalse(done.isReplayed());
  }

  @Test
  void unknownOutcomeIsAbortedAsUnknown() {
    String key = IdemdServer.freshKey("unknown");
    SocketTimeoutException timeout = new SocketTimeoutException("read timed out");
    OutcomeUnknownFailureException failure = assertThrows(OutcomeUnknownFailureException.class,
        () -> client.runOnce(key, FINGERPRINT, attempt -> {
          throw new OutcomeUnknown(timeout);
        }));
    OutcomeUnknown thrown = assertInstanceOf(OutcomeUnknown.class, failure.getCause());
    assertSame(timeout, thrown.getCause());
    Record aborted = server.lookup(NAMESPACE, key);
    assertEquals(State.STATE_ABORTED, aborted.getState());
    assertTrue(aborted.getOutcomeUnknown());

    Done done = client.runOnce(key, FINGERPRINT, attempt -> {
      PreviousAttempt previous = attempt.getPrevious();
      assertNotNull(previous);
      assertTrue(previous.isOutcomeUnknown());
      assertEquals(AbortedBy.ABORTED_BY_CALLER, previous.getAbortedBy());
      assertEquals("outcome unknown", previous.getAbortReason());
      return Response.ofText("charged", 201, "text/plain");
    });
    assertEquals(2, done.getAttempt());
  }

  private static void leaveOutcomeUnknown(String key) {
    assertThrows(OutcomeUnknownFailureException.class, () -> client.runOnce(key, FINGERPRINT, attempt -> {
      throw new OutcomeUnknown("timed out after sending");
    }));
  }

  @Test
  void reconcileHookCompletesWithoutRunning() {
    AtomicInteger hooks = new AtomicInteger();
    AtomicInteger runs = new AtomicInteger();
    Response atProvider = Response.ofText("{\"charge\":\"ch_found\"}", 201, "application/json");

    // The provider holds the earlier attempt's charge: stored, the operation does not run.
    String found = IdemdServer.freshKey("reconcile-found");
    leaveOutcomeUnknown(found);
    RunOptions finding = RunOptions.builder().reconcile(attempt -> {
      hooks.incrementAndGet();
      assertTrue(attempt.getPrevious().isOutcomeUnknown());
      return atProvider;
    }).build();
    Done reconciled = client.runOnce(found, FINGERPRINT, finding, answering(runs, "charged again"));
    assertTrue(reconciled.isReconciled());
    assertFalse(reconciled.isReplayed());
    assertEquals(atProvider, reconciled.getResponse());
    assertEquals(0, runs.get());
    assertEquals(1, hooks.get());
    assertEquals(State.STATE_COMPLETED, server.lookup(NAMESPACE, found).getState());
    assertEquals(atProvider, client.runOnce(found, FINGERPRINT, answering(runs, "x")).getResponse());

    // The provider holds nothing: the operation runs.
    String missing = IdemdServer.freshKey("reconcile-missing");
    leaveOutcomeUnknown(missing);
    RunOptions empty = RunOptions.builder().reconcile(attempt -> {
      hooks.incrementAndGet();
      return null;
    }).build();
    Done ran = client.runOnce(missing, FINGERPRINT, empty, answering(runs, "charged"));
    assertFalse(ran.isReconciled());
    assertEquals("charged", ran.getResponse().getBodyText());
    assertEquals(1, runs.get());
    assertEquals(2, hooks.get());

    // Not on attempt 1: nothing can have happened before it.
    Done fresh = client.runOnce(IdemdServer.freshKey("reconcile-fresh"), FINGERPRINT, empty, answering(runs, "first"));
    assertEquals(1, fresh.getAttempt());
    assertEquals(2, hooks.get());
    assertEquals(2, runs.get());
  }

  /** Lets every Begin reach idemd, but loses the reply of the first one on its way back. */
  private static final class LoseFirstBeginReply implements ClientInterceptor {
    final List<BeginRequest> requests = new CopyOnWriteArrayList<>();
    final List<BeginResponse> replies = new CopyOnWriteArrayList<>();
    private final AtomicBoolean lost = new AtomicBoolean();

    @Override
    public <ReqT, RespT> ClientCall<ReqT, RespT> interceptCall(
        MethodDescriptor<ReqT, RespT> method, CallOptions options, Channel next) {
      ClientCall<ReqT, RespT> call = next.newCall(method, options);
      if (!method.getFullMethodName().equals(IdempotencyGrpc.getBeginMethod().getFullMethodName())) {
        return call;
      }
      return new ForwardingClientCall.SimpleForwardingClientCall<>(call) {
        @Override
        public void start(Listener<RespT> listener, Metadata headers) {
          boolean lose = lost.compareAndSet(false, true);
          super.start(new ForwardingClientCallListener.SimpleForwardingClientCallListener<>(listener) {
            @Override
            public void onMessage(RespT message) {
              replies.add((BeginResponse) message);
              if (!lose) {
                super.onMessage(message);
              }
            }

            @Override
            public void onClose(Status status, Metadata trailers) {
              super.onClose(lose ? Status.DEADLINE_EXCEEDED.withDescription("reply lost by the test") : status,
                  lose ? new Metadata() : trailers);
            }
          }, headers);
        }

        @Override
        public void sendMessage(ReqT message) {
          requests.add((BeginRequest) message);
          super.sendMessage(message);
        }
      };
    }
  }

  @Test
  void lostBeginReplyRetriedWithTheSameNonceGetsTheSameLease() throws Exception {
    String key = IdemdServer.freshKey("lost-begin");
    LoseFirstBeginReply network = new LoseFirstBeginReply();
    ManagedChannel channel = Grpc.newChannelBuilder(server.address, InsecureChannelCredentials.create()).build();
    AtomicInteger runs = new AtomicInteger();
    try (IdemdClient lossy = IdemdClient.builder(ClientInterceptors.intercept(channel, network), NAMESPACE).build()) {
      Done done = lossy.runOnce(key, FINGERPRINT, answering(runs, "charged"));
      assertEquals(1, done.getAttempt());
    } finally {
      channel.shutdownNow();
    }

    assertEquals(1, runs.get());
    assertEquals(2, network.requests.size());
    String nonce = network.requests.get(0).getAttemptNonce();
    assertFalse(nonce.isEmpty());
    assertEquals(nonce, network.requests.get(1).getAttemptNonce());
    assertEquals(2, network.replies.size());
    assertTrue(network.replies.get(0).hasAcquired(), "idemd acted on the Begin whose reply was lost");
    assertEquals(network.replies.get(0).getAcquired().getLeaseToken(), network.replies.get(1).getAcquired().getLeaseToken());
    assertEquals(1, network.replies.get(1).getAcquired().getAttempt());
    assertEquals(List.of(EventKind.EVENT_KIND_ACQUIRED, EventKind.EVENT_KIND_COMPLETED), server.history(NAMESPACE, key));
  }

  @Test
  void heartbeatsKeepALongOperationAlive() {
    String key = IdemdServer.freshKey("heartbeats");
    try (IdemdClient shortLeases = server.client(NAMESPACE).leaseTtl(Duration.ofSeconds(1)).build()) {
      Done done = shortLeases.runOnce(key, FINGERPRINT, attempt -> {
        Thread.sleep(2500);
        return Response.ofText("slow but charged", 201, "text/plain");
      });
      assertEquals(1, done.getAttempt());
      assertFalse(done.isReplayed());
    }
    // No REAPED event: the lease never expired, although the operation outlived it twice over.
    assertEquals(List.of(EventKind.EVENT_KIND_ACQUIRED, EventKind.EVENT_KIND_COMPLETED), server.history(NAMESPACE, key));
  }

  private static void release(String key, int attempt) {
    server.admin().release(ReleaseRequest.newBuilder().setNamespace(NAMESPACE).setKey(key).setAttempt(attempt)
        .setReason("taken away by the test").build());
  }

  @Test
  void leaseLostBeginsAgain() {
    // Nobody else stored a result: Begin hands this call the record again (attempt 2), and the
    // result it already has is stored there without running the operation again.
    String key = IdemdServer.freshKey("lease-lost");
    AtomicInteger runs = new AtomicInteger();
    Done again = client.runOnce(key, FINGERPRINT, attempt -> {
      runs.incrementAndGet();
      release(key, attempt.getAttempt());
      return Response.ofText("mine", 201, "text/plain");
    });
    assertEquals(1, runs.get());
    assertFalse(again.isReplayed());
    assertEquals(2, again.getAttempt());
    assertEquals("mine", again.getResponse().getBodyText());
    assertEquals(List.of(EventKind.EVENT_KIND_ACQUIRED, EventKind.EVENT_KIND_RELEASED, EventKind.EVENT_KIND_ACQUIRED,
        EventKind.EVENT_KIND_COMPLETED), server.history(NAMESPACE, key));

    // Another attempt took over and stored its result first: Begin replays the winner's.
    String contested = IdemdServer.freshKey("lease-lost-winner");
    Done lost = client.runOnce(contested, FINGERPRINT, attempt -> {
      release(contested, attempt.getAttempt());
      Done winner = client.runOnce(contested, FINGERPRINT, answering(runs, "winner"));
      assertEquals(2, winner.getAttempt());
      return Response.ofText("loser", 201, "text/plain");
    });
    assertTrue(lost.isReplayed());
    assertEquals("winner", lost.getResponse().getBodyText());
    assertEquals(2, lost.getAttempt());
  }

  @Test
  void fingerprintMismatchIsItsOwnError() {
    String key = IdemdServer.freshKey("mismatch");
    AtomicInteger runs = new AtomicInteger();
    client.runOnce(key, FINGERPRINT, answering(runs, "1000 EUR"));
    byte[] other = Keys.fingerprint(Map.of("amount", "9999", "currency", "EUR"));

    IdemdException error = assertThrows(IdemdException.class, () -> client.runOnce(key, other, answering(runs, "9999 EUR")));

    assertInstanceOf(FingerprintMismatchException.class, error);
    assertEquals("FINGERPRINT_MISMATCH", error.getReason());
    assertEquals(Status.Code.FAILED_PRECONDITION, error.getStatus().getCode());
    assertEquals(key, error.getKey());
    assertTrue(error.getMessage().contains(key), error.getMessage());
    assertEquals(1, runs.get());
    Record record = server.lookup(NAMESPACE, key);
    assertArrayEquals(FINGERPRINT, record.getFingerprint().toByteArray());
    assertEquals("1000 EUR", record.getResponse().toStringUtf8());
  }

  /** Counts the Begin calls that leave the client. */
  private static final class CountBegins implements ClientInterceptor {
    final AtomicInteger begins = new AtomicInteger();

    @Override
    public <ReqT, RespT> ClientCall<ReqT, RespT> interceptCall(
        MethodDescriptor<ReqT, RespT> method, CallOptions options, Channel next) {
      if (method.getFullMethodName().equals(IdempotencyGrpc.getBeginMethod().getFullMethodName())) {
        begins.incrementAndGet();
      }
      return next.newCall(method, options);
    }
  }

  @Test
  void unavailableIsRetriedThenSurfaced() throws Exception {
    AtomicInteger runs = new AtomicInteger();

    // An address nobody listens on: every Begin is UNAVAILABLE; 1 call and 3 retries, then the error.
    CountBegins counter = new CountBegins();
    ManagedChannel nowhere = Grpc.newChannelBuilder("127.0.0.1:" + IdemdServer.freePort(), InsecureChannelCredentials.create()).build();
    try (IdemdClient unreachable = IdemdClient.builder(ClientInterceptors.intercept(nowhere, counter), NAMESPACE)
        .rpcRetries(3).build()) {
      UnavailableException error = assertThrows(UnavailableException.class,
          () -> unreachable.runOnce(IdemdServer.freshKey("nowhere"), FINGERPRINT, answering(runs, "never")));
      assertEquals(Status.Code.UNAVAILABLE, error.getStatus().getCode());
    } finally {
      nowhere.shutdownNow();
    }
    assertEquals(4, counter.begins.get());

    // A server that stopped: the same, never a success.
    IdemdServer stopping = IdemdServer.start();
    try (IdemdClient later = IdemdClient.builder("http://" + stopping.address, NAMESPACE).rpcRetries(2).build()) {
      later.runOnce(IdemdServer.freshKey("before-stop"), FINGERPRINT, answering(runs, "served"));
      stopping.close();
      assertThrows(UnavailableException.class,
          () -> later.runOnce(IdemdServer.freshKey("after-stop"), FINGERPRINT, answering(runs, "never")));
    } finally {
      stopping.close();
    }
    assertEquals(1, runs.get());
  }
}
