package idemd

import (
	"fmt"

	"google.golang.org/grpc/codes"
)

// Kind says what became of a RunOnce call that returned an error, and so
// what the caller may do next. Each kind is also an error value for
// errors.Is: errors.Is(err, idemd.ErrFingerprintMismatch).
type Kind int

const (
	// ErrInvalidArgument: a namespace, key, fingerprint, option or response
	// that idemd would refuse. Nothing ran.
	ErrInvalidArgument Kind = iota + 1
	// ErrFingerprintMismatch: the key was first used with another request
	// (a different fingerprint). Nothing ran; the record is unchanged.
	ErrFingerprintMismatch
	// ErrInProgress: another attempt still held the key when the
	// in-progress budget ran out. Nothing ran here; try again later.
	ErrInProgress
	// ErrLeaseLost: the operation ran, but its lease was taken over (or
	// released by an operator) before its outcome was stored, again and
	// again. Call RunOnce again: it replays the winner's result or runs a
	// new attempt with the same downstream key.
	ErrLeaseLost
	// ErrRetryable: nothing happened (the operation returned Retryable, or
	// the context ended before it ran) and the attempt was aborted, so a
	// retry runs the operation again.
	ErrRetryable
	// ErrOutcomeUnknown: the side effect may have happened. The attempt was
	// aborted as outcome-unknown (or its lease will expire, which says the
	// same), so the next attempt sees Attempt.Previous.OutcomeUnknown and
	// its reconcile hook runs first. Returned for OutcomeUnknown, for any
	// other error or panic of the operation, for a failed reconcile hook,
	// for a Retryable after an earlier unknown outcome nobody reconciled,
	// and when the outcome could not be stored.
	ErrOutcomeUnknown
	// ErrFinal: the stored outcome (run here or replayed) is a final
	// failure, turned back into the caller's error by WithFinalError. The
	// cause is that error; Done still carries the stored response.
	ErrFinal
	// ErrRPC: idemd refused or could not be reached before anything ran:
	// UNAVAILABLE or DEADLINE_EXCEEDED past the retries, UNAUTHENTICATED,
	// PERMISSION_DENIED, RESOURCE_EXHAUSTED, or the context ended. Error.Code
	// and status.Code(err) give the gRPC code.
	ErrRPC
)

var kindNames = map[Kind]string{
	ErrInvalidArgument:     "invalid argument",
	ErrFingerprintMismatch: "fingerprint mismatch: the key was used with a different request",
	ErrInProgress:          "another attempt is still in progress",
	ErrLeaseLost:           "lease lost before the outcome was stored",
	ErrRetryable:           "retryable failure (aborted)",
	ErrOutcomeUnknown:      "outcome unknown (aborted as outcome-unknown)",
	ErrFinal:               "final failure",
	ErrRPC:                 "idemd call failed",
}

func (k Kind) String() string {
	if name, ok := kindNames[k]; ok {
		return name
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// Error makes a Kind usable as an errors.Is target.
func (k Kind) Error() string { return "idemd: " + k.String() }

// Error is the one error type RunOnce returns (errors.As(err, &e)). It wraps
// its cause: the operation's own error, the reconcile hook's, the context's
// or idemd's gRPC status, so errors.Is(err, context.Canceled) and
// status.Code(err) see through it.
type Error struct {
	Kind Kind
	// Key is the idempotency key of the call.
	Key string
	// Attempt is the attempt that ran, 0 when none was acquired.
	Attempt uint32
	// Code is idemd's gRPC code when idemd answered the error
	// (codes.OK otherwise).
	Code codes.Code
	// Reason is the google.rpc.ErrorInfo reason idemd attached, e.g.
	// "FINGERPRINT_MISMATCH" or "LEASE_LOST".
	Reason string
	// Err is the cause, if any.
	Err error
}

func (e *Error) Error() string {
	text := "idemd: " + e.Kind.String()
	if e.Key != "" {
		text += fmt.Sprintf(" (key %q", e.Key)
		if e.Attempt > 0 {
			text += fmt.Sprintf(", attempt %d", e.Attempt)
		}
		text += ")"
	}
	if e.Err != nil {
		text += ": " + e.Err.Error()
	}
	return text
}

func (e *Error) Unwrap() error { return e.Err }

// Is reports whether target is e's Kind.
func (e *Error) Is(target error) bool {
	kind, ok := target.(Kind)
	return ok && kind == e.Kind
}

// What an operation returns to say how it failed. Wrapping them further
// (fmt.Errorf("charge: %w", idemd.Retryable(err))) keeps their meaning.
type (
	finalFailure   struct{ response Response }
	retryable      struct{ err error }
	outcomeUnknown struct{ err error }
)

// Final is the operation's deterministic failure (a declined card): the
// response is stored with Complete and replayed to every later run, exactly
// like a success. RunOnce returns it in Done with a nil error, unless
// WithFinalError turns it back into an error.
func Final(response Response) error { return &finalFailure{response} }

// Retryable says the operation failed and nothing happened (a 503, a
// refused connection, the provider's "idempotency key in use"): the attempt
// is aborted and RunOnce returns ErrRetryable, so a retry runs it again.
func Retryable(err error) error { return &retryable{err} }

// OutcomeUnknown says the operation may or may not have happened (the
// request left and no answer came: a timeout, a dropped connection): the
// attempt is aborted as outcome-unknown and RunOnce returns
// ErrOutcomeUnknown. The next attempt sees Previous.OutcomeUnknown.
func OutcomeUnknown(err error) error { return &outcomeUnknown{err} }

func (f *finalFailure) Error() string {
	return fmt.Sprintf("final failure (response code %d)", f.response.Code)
}

func (r *retryable) Error() string      { return "retryable: " + errorText(r.err) }
func (r *retryable) Unwrap() error      { return r.err }
func (o *outcomeUnknown) Error() string { return "outcome unknown: " + errorText(o.err) }
func (o *outcomeUnknown) Unwrap() error { return o.err }

func errorText(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}

// invalid is an ErrInvalidArgument found on the client side, before any RPC.
func invalid(key, format string, args ...any) *Error {
	return &Error{Kind: ErrInvalidArgument, Key: key, Err: fmt.Errorf(format, args...)}
}
