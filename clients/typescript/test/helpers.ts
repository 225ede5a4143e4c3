// What every test file shares: a real idemd started from IDEMD_BIN on a port
// the kernel picks, with a fresh SQLite database, and raw stubs to look at
// (Lookup) and act on (Admin.Release) what it stores.
//
// The tests import the client by its package name, "@idemd/client": in this
// folder that is the package itself (a self-reference through its "exports"),
// and in a project that installed the packed tarball it is the installed copy,
// so the same compiled tests prove either.
import { spawn } from "child_process";
import { randomUUID } from "crypto";
import { mkdtempSync, readFileSync, rmSync } from "fs";
import * as os from "os";
import * as path from "path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { Client, ClientOptions, Response, protoOptions } from "@idemd/client";

/** This package's folder (the tests run from dist/test). */
export const PACKAGE = path.join(__dirname, "..", "..");

export const NAMESPACE = "ts-payments";

export interface Idemd {
  /** host:port */
  address: string;
  /** The raw Idempotency service (Lookup). */
  stub: any;
  /** The raw Admin service (Release). */
  admin: any;
  stop(): Promise<void>;
}

/** The idemd binary: IDEMD_BIN, or the repository's debug build. */
function binary(): string {
  return process.env.IDEMD_BIN ?? path.join(PACKAGE, "..", "..", "target", "debug", "idemd");
}

/** Starts `idemd serve` on 127.0.0.1:0 and resolves once it logs the address it listens on. */
export async function startIdemd(): Promise<Idemd> {
  const folder = mkdtempSync(path.join(os.tmpdir(), "idemd-ts-"));
  const child = spawn(
    binary(),
    ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--database-url", `sqlite://${folder}/idemd.db`,
      "--reaper-interval", "100ms"],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  let log = "";
  const address = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`idemd did not log "idemd listening" within 30 s:\n${log}`)), 30_000);
    child.once("error", (error) => reject(new Error(`cannot start ${binary()} (set IDEMD_BIN to a built idemd): ${error.message}`)));
    void exited.then(() => reject(new Error(`idemd exited before listening:\n${log}`)));
    // Keep reading to the end, or idemd would block on a full pipe.
    child.stderr!.on("data", (chunk: Buffer) => {
      log += chunk.toString();
      const listening = /idemd listening addr=(\S+)/.exec(log);
      if (listening) {
        clearTimeout(timer);
        resolve(listening[1]);
      }
    });
  });
  const loaded = grpc.loadPackageDefinition(protoLoader.loadSync(["idemd/v1/idempotency.proto", "idemd/v1/admin.proto"], protoOptions)) as any;
  const credentials = grpc.credentials.createInsecure();
  const stub = new loaded.idemd.v1.Idempotency(address, credentials);
  const admin = new loaded.idemd.v1.Admin(address, credentials);
  return {
    address,
    stub,
    admin,
    async stop() {
      stub.close();
      admin.close();
      child.kill("SIGTERM");
      await exited;
      rmSync(folder, { recursive: true, force: true });
    },
  };
}

function unary(stub: any, method: string, request: object): Promise<any> {
  return new Promise((resolve, reject) =>
    stub[method](request, { deadline: Date.now() + 5_000 }, (error: Error | null, response: any) => (error ? reject(error) : resolve(response))),
  );
}

/** What idemd stored for a key (Lookup). */
export async function lookup(server: Idemd, key: string, namespace = NAMESPACE): Promise<any> {
  return (await unary(server.stub, "Lookup", { namespace, key })).record;
}

/** Ends a running attempt as an operator would (Admin.Release), so its holder's Complete answers LEASE_LOST. */
export async function release(server: Idemd, key: string, attempt: number, namespace = NAMESPACE): Promise<void> {
  await unary(server.admin, "Release", { namespace, key, attempt, reason: "test: taken over", outcome_unknown: true });
}

/** A client of `server` with short leases and waits, so that the tests that wait on them stay short. */
export function client(server: Idemd, options: ClientOptions = {}): Client {
  return new Client(server.address, NAMESPACE, { leaseTtlMs: 2_000, waitMs: 2_000, inProgressBudgetMs: 15_000, rpcRetries: 1, ...options });
}

export const key = (label = "order") => `${label}-${randomUUID()}`;

export const ok = (body: string): Response => ({ body, code: 201, contentType: "application/json" });

export const delay = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** The shared test data of every client (clients/testdata, copied into test/testdata by scripts/sync). */
export function testdata(name: string): any {
  return JSON.parse(readFileSync(path.join(PACKAGE, "test", "testdata", name), "utf8"));
}

/** A promise and its resolve function, to hold an operation until the test lets it go. */
export function gate(): { wait: Promise<void>; open: () => void } {
  let open!: () => void;
  const wait = new Promise<void>((resolve) => (open = resolve));
  return { wait, open };
}

/** Counts the RPCs a client sends, by method ("Begin", "Heartbeat", …). */
export function rpcCounter(): { counts: Map<string, number>; interceptor: grpc.Interceptor } {
  const counts = new Map<string, number>();
  const interceptor: grpc.Interceptor = (options, next) => {
    const method = options.method_definition.path.split("/").pop()!;
    counts.set(method, (counts.get(method) ?? 0) + 1);
    return new grpc.InterceptingCall(next(options));
  };
  return { counts, interceptor };
}
