import dev.idemd.client.Attempt;
import dev.idemd.client.Done;
import dev.idemd.client.Final;
import dev.idemd.client.IdemdClient;
import dev.idemd.client.Keys;
import dev.idemd.client.OutcomeUnknown;
import dev.idemd.client.Response;
import dev.idemd.client.Retryable;
import dev.idemd.client.RunOptions;
import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.net.URI;
import java.net.URLEncoder;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;

/**
 * The Java worker of the payment demo (its protocol: examples/payments/polyglot.rs). It charges its
 * share of the payments through the HTTP provider with runOnce, and exits between charging and
 * completing when the provider says so.
 */
public final class Worker {
  private static final String PROVIDER = env("PROVIDER_URL");
  private static final String WORKER = env("WORKER");
  private static final HttpClient WEB = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(5)).build();

  private static String env(String name) {
    String value = System.getenv(name);
    if (value == null) {
      throw new IllegalStateException(name + " is not set (the worker runs under examples/payments/run)");
    }
    return value;
  }

  private static Response stored(int code, byte[] body) {
    return new Response(body, code, "application/json");
  }

  /** The operation: what the provider's answer means for idemd. */
  private static Response charge(int payment, Attempt attempt) throws InterruptedException {
    String body = "{\"payment\":\"pay-" + payment + "\",\"amount\":\"" + (1000 + 7 * payment) + "\",\"currency\":\"EUR\"}";
    HttpRequest request = HttpRequest.newBuilder(URI.create(PROVIDER + "/v1/charges"))
        .timeout(Duration.ofSeconds(10))
        .header("content-type", "application/json")
        .header("idempotency-key", attempt.getDownstreamKey())
        .header("demo-worker", WORKER)
        .POST(HttpRequest.BodyPublishers.ofString(body))
        .build();
    HttpResponse<byte[]> answer;
    try {
      answer = WEB.send(request, HttpResponse.BodyHandlers.ofByteArray());
    } catch (IOException e) {
      // The request may have left: whether it charged is unknown.
      throw new OutcomeUnknown(e);
    }
    switch (answer.statusCode()) {
      case 201:
        if (answer.headers().firstValue("demo-crash").orElse("").equals("now")) {
          Runtime.getRuntime().halt(3); // charged, and the process dies before telling idemd
        }
        return stored(201, answer.body());
      case 402:
        throw new Final(stored(402, answer.body()));
      case 504:
        throw new OutcomeUnknown("the provider's answer was lost");
      default:
        throw new Retryable("the provider answered " + answer.statusCode());
    }
  }

  /** The reconcile hook: what the provider holds for the downstream key. */
  private static Response find(Attempt attempt) throws IOException, InterruptedException {
    String key = URLEncoder.encode(attempt.getDownstreamKey(), StandardCharsets.UTF_8);
    HttpRequest request = HttpRequest.newBuilder(URI.create(PROVIDER + "/v1/charges?idempotency_key=" + key))
        .timeout(Duration.ofSeconds(10))
        .build();
    HttpResponse<byte[]> answer = WEB.send(request, HttpResponse.BodyHandlers.ofByteArray());
    switch (answer.statusCode()) {
      case 200:
        return stored(201, answer.body());
      case 402:
        return stored(402, answer.body());
      case 404:
        return null;
      default:
        throw new IOException("the lookup answered " + answer.statusCode());
    }
  }

  public static void main(String[] args) throws Exception {
    List<Integer> payments = new ArrayList<>();
    for (String field : env("PAYMENTS").split(",")) {
      if (!field.isEmpty()) {
        payments.add(Integer.parseInt(field));
      }
    }
    RunOptions.Builder options = RunOptions.builder();
    if (env("RECONCILE").equals("on")) {
      options.reconcile(Worker::find);
    }
    RunOptions run = options.build();
    AtomicInteger completed = new AtomicInteger();
    AtomicInteger replayed = new AtomicInteger();
    AtomicInteger reconciled = new AtomicInteger();
    AtomicInteger unfinished = new AtomicInteger();
    try (IdemdClient client = IdemdClient.builder(env("IDEMD_ADDR"), env("NAMESPACE"))
        .leaseTtl(Duration.ofSeconds(1))
        .waitTimeout(Duration.ofMillis(500))
        .inProgressBudget(Duration.ofSeconds(2))
        .build()) {
      // The first call loads gRPC and opens the connection: done before the race; its failure is
      // no matter.
      try {
        client.runOnce("warm-up-" + ThreadLocalRandom.current().nextLong(Long.MAX_VALUE), new byte[0],
            attempt -> stored(200, new byte[0]));
      } catch (RuntimeException e) {
        // the race shows whether idemd works
      }
      System.out.println("ready");
      new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8)).readLine();
      ExecutorService lanes = Executors.newFixedThreadPool(Integer.parseInt(env("CONCURRENCY")));
      for (int payment : payments) {
        lanes.execute(() -> {
          String id = "pay-" + payment;
          String key = Keys.entityKey(id, "charge");
          byte[] fingerprint = Keys.fingerprint(
              Map.of("payment", id, "amount", String.valueOf(1000 + 7 * payment), "currency", "EUR"));
          for (int tries = 0; tries < 60; tries++) {
            Done done;
            try {
              done = client.runOnce(key, fingerprint, run, attempt -> charge(payment, attempt));
            } catch (RuntimeException e) {
              // Every failure of a call is retried here; idemd says when it ran.
              sleep(ThreadLocalRandom.current().nextInt(20, 200));
              continue;
            }
            String how = done.isReplayed() ? "replayed" : done.isReconciled() ? "reconciled" : "completed";
            (done.isReplayed() ? replayed : done.isReconciled() ? reconciled : completed).incrementAndGet();
            synchronized (System.out) {
              System.out.println("result " + id + " " + how + " " + done.getResponse().getCode() + " "
                  + done.getResponse().getBodyText());
            }
            return;
          }
          unfinished.incrementAndGet();
        });
      }
      lanes.shutdown();
      lanes.awaitTermination(10, TimeUnit.MINUTES);
    }
    System.out.println("summary completed=" + completed + " replayed=" + replayed + " reconciled=" + reconciled
        + " unfinished=" + unfinished);
  }

  private static void sleep(long millis) {
    try {
      Thread.sleep(millis);
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
    }
  }
}
