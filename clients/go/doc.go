// Package idemd is the Go client of idemd, the idempotency service: it runs
// an operation (a payment) at most once per idempotency key, whatever the
// callers do: retry, race, crash or lose replies.
//
// [Client.RunOnce] does the protocol's hard parts in one place: Begin before
// anything; a completed key replays the stored response; an acquired key
// runs the operation with the downstream key for the payment provider and
// heartbeats in a goroutine, then Complete (a success, or a [Final]
// failure such as a declined card) or Abort ([Retryable]: nothing happened;
// [OutcomeUnknown], any other error or a panic: it may have happened); a key
// in progress elsewhere is waited on. Every RPC is retried a bounded number
// of times on UNAVAILABLE and DEADLINE_EXCEEDED, Begin with the same attempt
// nonce, so a lost reply cannot orphan a lease. Every error is an [*Error]
// whose [Kind] says what became of the operation.
//
// [EntityKey] and [Fingerprint] compute keys and fingerprints exactly as the
// other languages' clients do. The package idemdv1 holds the contract's
// generated code, for calls RunOnce does not make.
package idemd
