package dev.idemd.client;

import static org.junit.jupiter.api.Assertions.fail;

import dev.idemd.v1.AdminGrpc;
import dev.idemd.v1.Event;
import dev.idemd.v1.EventKind;
import dev.idemd.v1.GetHistoryRequest;
import dev.idemd.v1.IdempotencyGrpc;
import dev.idemd.v1.LookupRequest;
import dev.idemd.v1.Record;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.UncheckedIOException;
import java.net.ServerSocket;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.List;
import java.util.UUID;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.stream.Collectors;
import java.util.stream.Stream;

/**
 * A real idemd for the tests: the binary named by IDEMD_BIN on a free loopback port with a fresh
 * SQLite database. Without IDEMD_BIN the tests that need it are skipped (a copy of clients/java builds
 * with plain {@code mvn install}), unless -Didemd.requireServer=true, which scripts/test passes.
 */
final class IdemdServer implements AutoCloseable {
  final String address;
  final ManagedChannel channel;
  private final Process process;
  private final Path dir;
  private final List<String> log = new ArrayList<>();
  private boolean closed;

  private IdemdServer(Process process, String address, Path dir) {
    this.process = process;
    this.address = address;
    this.dir = dir;
    this.channel = Grpc.newChannelBuilder(address, InsecureChannelCredentials.create()).build();
  }

  static IdemdServer start() throws IOException, InterruptedException {
    if (!available()) {
      fail("IDEMD_BIN is not set");
    }
    String bin = System.getenv("IDEMD_BIN");
    if (!Files.isExecutable(Path.of(bin))) {
      fail("IDEMD_BIN=" + bin + " is not an executable file");
    }
    Path dir = Files.createTempDirectory("idemd-java-test");
    int port = freePort();
    String address = "127.0.0.1:" + port;
    Process process = new ProcessBuilder(bin, "serve", "--listen", address, "--metrics-listen", "127.0.0.1:0",
        "--database-url", "sqlite://" + dir.resolve("idemd.db"), "--reaper-interval", "100ms")
        .redirectOutput(ProcessBuilder.Redirect.DISCARD)
        .start();
    IdemdServer server = new IdemdServer(process, address, dir);
    CountDownLatch listening = new CountDownLatch(1);
    // Drained for the server's whole life: a full stderr pipe would block it.
    Thread reader = new Thread(() -> {
      try (BufferedReader lines = new BufferedReader(new InputStreamReader(process.getErrorStream(), StandardCharsets.UTF_8))) {
        for (String line; (line = lines.readLine()) != null; ) {
          synchronized (server.log) {
            server.log.add(line);
          }
          if (line.contains("idemd listening")) {
            listening.countDown();
          }
        }
      } catch (IOException e) {
        // the server exited
      }
    }, "idemd-stderr");
    reader.setDaemon(true);
    reader.start();
    if (!listening.await(30, TimeUnit.SECONDS)) {
      server.close();
      fail("idemd did not log 'idemd listening' within 30 s:\n" + server.log());
    }
    return server;
  }

  /**
   * Whether the tests against a real idemd can run (the condition of their {@code @EnabledIf}, so a
   * build without IDEMD_BIN reports each of them as skipped).
   */
  static boolean available() {
    String bin = System.getenv("IDEMD_BIN");
    if (bin != null && !bin.isEmpty()) {
      return true;
    }
    if (Boolean.getBoolean("idemd.requireServer")) {
      throw new IllegalStateException("IDEMD_BIN is not set: point it at a built idemd binary");
    }
    return false;
  }

  /** A key no other test uses. */
  static String freshKey(String what) {
    return what + "-" + UUID.randomUUID();
  }

  static int freePort() throws IOException {
    try (ServerSocket socket = new ServerSocket(0)) {
      return socket.getLocalPort();
    }
  }

  IdemdClient.Builder client(String namespace) {
    return IdemdClient.builder(address, namespace);
  }

  Record lookup(String namespace, String key) {
    return IdempotencyGrpc.newBlockingStub(channel)
        .lookup(LookupRequest.newBuilder().setNamespace(namespace).setKey(key).build())
        .getRecord();
  }

  AdminGrpc.AdminBlockingStub admin() {
    return AdminGrpc.newBlockingStub(channel);
  }

  List<EventKind> history(String namespace, String key) {
    return admin().getHistory(GetHistoryRequest.newBuilder().setNamespace(namespace).setKey(key).build())
        .getEventsList().stream().map(Event::getKind).collect(Collectors.toList());
  }

  String log() {
    synchronized (log) {
      return String.join("\n", log);
    }
  }

  /** Stops the server and removes its database; a second call does nothing. */
  @Override
  public synchronized void close() {
    if (closed) {
      return;
    }
    closed = true;
    channel.shutdownNow();
    process.destroy();
    try {
      if (!process.waitFor(10, TimeUnit.SECONDS)) {
        process.destroyForcibly().waitFor();
      }
    } catch (InterruptedException e) {
      process.destroyForcibly();
      Thread.currentThread().interrupt();
    }
    try (Stream<Path> files = Files.walk(dir)) {
      for (Path file : files.sorted(Comparator.reverseOrder()).collect(Collectors.toList())) {
        Files.deleteIfExists(file);
      }
    } catch (IOException e) {
      throw new UncheckedIOException(e);
    }
  }
}
