// The wire: the contract loaded at run time from the proto/ folder the package
// carries, idemd's ErrorInfo reason, and protobuf durations and timestamps.
import * as path from "path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import * as protobuf from "protobufjs";

/**
 * The folder of idemd's .proto files shipped with this package
 * (`idemd/v1/idempotency.proto`, `idemd/v1/admin.proto`), for loading other
 * services or calls with `@grpc/proto-loader` (Lookup, the Admin service).
 */
export const protoDir: string = path.join(__dirname, "..", "..", "proto");

/** The loading options the client uses: field names as in the .proto, enums as their names, 64-bit integers as strings. */
export const protoOptions: protoLoader.Options = {
  includeDirs: [protoDir],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
};

type Callback = (error: grpc.ServiceError | null, response: any) => void;
export type Stub = grpc.Client &
  Record<string, (request: object, metadata: grpc.Metadata, options: grpc.CallOptions, callback: Callback) => grpc.ClientUnaryCall>;
export type StubConstructor = new (target: string, credentials: grpc.ChannelCredentials, options?: grpc.ClientOptions) => Stub;

let idempotency: StubConstructor | undefined;

/** The generated client class of idemd.v1.Idempotency; the contract is parsed once per process. */
export function idempotencyService(): StubConstructor {
  if (!idempotency) {
    const definition = protoLoader.loadSync("idemd/v1/idempotency.proto", protoOptions);
    idempotency = (grpc.loadPackageDefinition(definition) as any).idemd.v1.Idempotency as StubConstructor;
  }
  return idempotency;
}

const rpcTypes = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: { nested: { Any: { fields: { type_url: { type: "string", id: 1 }, value: { type: "bytes", id: 2 } } } } },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: "int32", id: 1 },
                message: { type: "string", id: 2 },
                details: { rule: "repeated", type: "google.protobuf.Any", id: 3 },
              },
            },
            ErrorInfo: { fields: { reason: { type: "string", id: 1 }, domain: { type: "string", id: 2 } } },
          },
        },
      },
    },
  },
});

/** The `google.rpc.ErrorInfo` reason idemd attached to a gRPC error, if any ("FINGERPRINT_MISMATCH", "LEASE_LOST", …). */
export function reasonOf(error: unknown): string | undefined {
  const metadata = (error as grpc.ServiceError | undefined)?.metadata;
  const raw = metadata instanceof grpc.Metadata ? metadata.get("grpc-status-details-bin")[0] : undefined;
  if (!(raw instanceof Uint8Array)) return undefined;
  try {
    const status = rpcTypes.lookupType("google.rpc.Status").decode(raw) as unknown as {
      details: { type_url: string; value: Uint8Array }[];
    };
    for (const detail of status.details) {
      if (detail.type_url.endsWith("/google.rpc.ErrorInfo")) {
        return (rpcTypes.lookupType("google.rpc.ErrorInfo").decode(detail.value) as unknown as { reason: string }).reason;
      }
    }
  } catch {
    // Not a google.rpc.Status: no reason.
  }
  return undefined;
}

/** Whether `error` is a gRPC error (it has a numeric status code). */
export function isServiceError(error: unknown): error is grpc.ServiceError {
  return error instanceof Error && typeof (error as grpc.ServiceError).code === "number" && "details" in error;
}

/** UNAVAILABLE and DEADLINE_EXCEEDED: the only codes a call is retried on. */
export function isTransient(error: unknown): boolean {
  const code = (error as grpc.ServiceError | undefined)?.code;
  return code === grpc.status.UNAVAILABLE || code === grpc.status.DEADLINE_EXCEEDED;
}

export function duration(ms: number): { seconds: string; nanos: number } {
  const whole = Math.floor(ms);
  return { seconds: String(Math.floor(whole / 1000)), nanos: (whole % 1000) * 1_000_000 };
}

export function durationMs(value: { seconds?: string | number; nanos?: number } | null | undefined): number {
  return value ? Number(value.seconds ?? 0) * 1000 + (value.nanos ?? 0) / 1e6 : 0;
}

export function timestamp(value: { seconds?: string | number; nanos?: number } | null | undefined): Date | undefined {
  return value ? new Date(Number(value.seconds ?? 0) * 1000 + Math.floor((value.nanos ?? 0) / 1e6)) : undefined;
}
