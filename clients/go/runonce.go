package idemd

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/idemd/idemd/clients/go/idemdv1"
)

// Response is an outcome as idemd stores it and replays it to every retry.
type Response struct {
	Body []byte
	// Code is an application status, e.g. 201 for a charge, 402 for a
	// declined card.
	Code        int32
	ContentType string
}

// Attempt is what the operation is told about the attempt it runs in.
type Attempt struct {
	// DownstreamKey is "idk_" + 32 hex digits: pass it to the payment
	// provider as its idempotency key. Every attempt of the key gets the
	// same one, so a provider that deduplicates on it charges once even
	// when an earlier attempt crashed after charging.
	DownstreamKey string
	// Number is 1, 2, ...: a fencing number to forward downstream.
	Number uint32
	// Previous says how attempt Number-1 ended; nil on attempt 1.
	Previous *PreviousAttempt
}

// PreviousAttempt is how the attempt before this one ended (idemd's
// Acquired.previous).
type PreviousAttempt struct {
	// Number is always the current attempt's Number - 1.
	Number uint32
	// AbortedBy is its caller (Abort), the reaper (its lease expired) or
	// an operator (Admin.Release).
	AbortedBy pb.AbortedBy
	// AbortReason is "lease expired" for an expired lease, else the reason
	// given.
	AbortReason string
	// OutcomeUnknown: the side effect may have happened under this same
	// DownstreamKey (aborted as OutcomeUnknown, released so by an operator,
	// or its lease expired after a crash).
	OutcomeUnknown bool
	// EndedAt is when it ended (idemd's clock).
	EndedAt time.Time
}

// Done is the result of a RunOnce that returned an outcome.
type Done struct {
	Response Response
	// Replayed: the operation did not run here; an earlier attempt's stored
	// response was returned.
	Replayed bool
	// Reconciled: the operation did not run here; the reconcile hook found
	// an earlier attempt's result at the provider, and it is now stored.
	Reconciled bool
	// Attempt is the attempt that produced the response.
	Attempt uint32
}

// Operation is the side effect to run at most once per key. It returns the
// response to store (a success), or an error: Final(response) for a
// deterministic failure (stored and replayed like a success),
// Retryable(err) when nothing happened, OutcomeUnknown(err) when it may
// have happened. Any other error, and a panic, count as OutcomeUnknown: the
// helper cannot tell whether the provider was called before it, and
// treating it as "nothing happened" could charge twice.
type Operation func(ctx context.Context, attempt Attempt) (Response, error)

// ReconcileFunc asks a provider that does not deduplicate on the downstream
// key what it holds for attempt.DownstreamKey. RunOnce calls it before the
// operation, under the lease, only when attempt.Previous.OutcomeUnknown is
// set:
//
//   - a non-nil *Response (or a Final error): the earlier attempt did it; the
//     response is stored and returned with Done.Reconciled, and the
//     operation does not run;
//   - nil, nil: it did not; the operation runs as usual;
//   - an error: the question stays open; the attempt is aborted as
//     outcome-unknown (the next attempt asks again) and RunOnce returns
//     ErrOutcomeUnknown wrapping it.
//
// A lookup cannot see a request still in flight at the provider: let the
// provider's own request timeout pass since Previous.EndedAt before you
// trust an empty answer.
type ReconcileFunc func(ctx context.Context, attempt Attempt) (*Response, error)

// leaseLosses is how many times one RunOnce begins again after its lease was
// taken over before it gives up with ErrLeaseLost: each loss means another
// attempt owns the key, and chasing it forever would never return.
const leaseLosses = 2

// RunOnce runs operation at most once per key (in the client's namespace)
// and returns its response, or the stored response of the attempt that ran
// it. fingerprint identifies the request (Fingerprint; at most 64 bytes): a
// key reused with another fingerprint is ErrFingerprintMismatch.
//
// Begin first: a completed key is replayed without running; a key another
// attempt holds is waited on (WithWait per Begin, then backoff until
// WithInProgressBudget); an acquired key runs the operation with
// heartbeats in a goroutine every third of the lease TTL, then Complete
// (success or Final) or Abort (anything else), always: no error, panic or
// cancelled context leaves the lease held until it expires. A panic is
// re-raised after the Abort. Once the operation has returned, its outcome
// is stored even if ctx has ended meanwhile (each RPC bounded by the RPC
// timeout): an unstored outcome is worse than a late return.
//
// If Complete answers LEASE_LOST (the lease expired, or an operator
// released it), RunOnce begins again: it returns the winner's stored result,
// or, when Begin hands it the same record again (same downstream key), it
// stores the response it already has under the new attempt: the operation
// never runs twice in one call. At most twice more, then ErrLeaseLost.
//
// Every error is an *Error; its Kind says what became of the operation.
func (c *Client) RunOnce(ctx context.Context, key string, fingerprint []byte, operation Operation, options ...RunOption) (Done, error) {
	s := c.defaults
	for _, option := range options {
		option.applyRun(&s)
	}
	for _, check := range []error{validateSettings(&s), validateKey(key), validateFingerprint(fingerprint)} {
		if check != nil {
			return Done{}, &Error{Kind: ErrInvalidArgument, Key: key, Err: check}
		}
	}
	if operation == nil {
		return Done{}, invalid(key, "operation is nil")
	}
	// What this call's operation (or hook) produced once it has run, and
	// under which downstream key: kept across a lost lease.
	var known *Done
	knownDownstreamKey := ""
	for losses := 0; ; losses++ {
		lease, replayed, err := c.acquire(ctx, &s, key, fingerprint)
		if err != nil {
			return Done{}, err
		}
		if replayed != nil {
			return finish(&s, key, *replayed)
		}
		var result Done
		switch {
		case known == nil:
			if result, err = c.runAttempt(ctx, &s, key, lease, operation); err != nil {
				return Done{}, err
			}
		case lease.GetDownstreamKey() == knownDownstreamKey:
			// The same record again after LEASE_LOST: this call already
			// knows what happened under this downstream key.
			result = *known
		default:
			// The record was invalidated (or expired) and replaced
			// meanwhile: this call's operation did not run for it.
			c.abort(context.WithoutCancel(ctx), &s, key, lease.GetLeaseToken(),
				"the record was replaced after this call lost its lease", false)
			return Done{}, &Error{Kind: ErrLeaseLost, Key: key, Attempt: lease.GetAttempt(),
				Err: errors.New("the lease was lost after the operation ran, and the key now names a new record; its result was not stored")}
		}
		result.Attempt = lease.GetAttempt()
		lost, err := c.store(ctx, &s, key, lease.GetLeaseToken(), result)
		if lost == nil {
			if err != nil {
				return Done{}, err
			}
			return finish(&s, key, result)
		}
		if losses >= leaseLosses {
			return Done{}, rpcFailure(ctx, ErrLeaseLost, key, lease.GetAttempt(), lost)
		}
		known, knownDownstreamKey = &result, lease.GetDownstreamKey()
	}
}

func finish(s *settings, key string, done Done) (Done, error) {
	if s.finalError != nil {
		if err := s.finalError(done.Response); err != nil {
			return done, &Error{Kind: ErrFinal, Key: key, Attempt: done.Attempt, Err: err}
		}
	}
	return done, nil
}

// rpcFailure is the *Error of a kind caused by an idemd RPC's error, with
// idemd's code and reason, and the context's error when it ended first.
// (Only idemd's errors: an operation's error may carry a gRPC status of the
// provider's, which is not idemd's code.)
func rpcFailure(ctx context.Context, kind Kind, key string, attempt uint32, cause error) *Error {
	e := &Error{Kind: kind, Key: key, Attempt: attempt, Err: cause}
	if st, ok := status.FromError(cause); ok && cause != nil {
		e.Code, e.Reason = st.Code(), reason(cause)
		// A status error does not wrap the context's: keep both visible
		// to errors.Is.
		if ctxErr := ctx.Err(); ctxErr != nil && (e.Code == codes.Canceled || e.Code == codes.DeadlineExceeded) {
			e.Err = fmt.Errorf("%w: %w", ctxErr, cause)
		}
	}
	return e
}

func newNonce() string {
	var bytes [16]byte
	_, _ = rand.Read(bytes[:])
	return hex.EncodeToString(bytes[:])
}

// acquire calls Begin until it acquires the key (a lease) or finds it
// completed (a replay), waiting on another attempt up to the in-progress
// budget. One nonce serves every Begin of the round, so a Begin whose reply
// was lost and is sent again gets the same lease back.
func (c *Client) acquire(ctx context.Context, s *settings, key string, fingerprint []byte) (*pb.Acquired, *Done, error) {
	nonce := newNonce()
	giveUp := time.Now().Add(s.inProgressBudget)
	for {
		wait := max(0, min(s.wait, time.Until(giveUp)))
		request := &pb.BeginRequest{
			Namespace:    c.namespace,
			Key:          key,
			Fingerprint:  fingerprint,
			LeaseTtl:     durationpb.New(s.leaseTTL),
			WaitTimeout:  durationpb.New(wait),
			AttemptNonce: nonce,
		}
		if s.retention > 0 {
			request.Retention = durationpb.New(s.retention)
		}
		response, err := call(ctx, c, s, s.rpcTimeout+wait, c.stub.Begin, request)
		if err != nil {
			kind := ErrRPC
			switch {
			case reason(err) == "FINGERPRINT_MISMATCH":
				kind = ErrFingerprintMismatch
			case status.Code(err) == codes.InvalidArgument:
				kind = ErrInvalidArgument
			}
			return nil, nil, rpcFailure(ctx, kind, key, 0, err)
		}
		switch outcome := response.GetOutcome().(type) {
		case *pb.BeginResponse_Acquired:
			return outcome.Acquired, nil, nil
		case *pb.BeginResponse_Completed:
			return nil, replay(outcome.Completed), nil
		case *pb.BeginResponse_InProgress:
			if !time.Now().Before(giveUp) {
				return nil, nil, &Error{Kind: ErrInProgress, Key: key}
			}
			hint := outcome.InProgress.GetRetryAfter().AsDuration()
			if hint <= 0 {
				hint = 200 * time.Millisecond
			}
			if err := sleep(ctx, jitter(hint)); err != nil {
				return nil, nil, &Error{Kind: ErrRPC, Key: key, Err: err}
			}
		default:
			return nil, nil, &Error{Kind: ErrRPC, Key: key, Err: errors.New("Begin answered without an outcome")}
		}
	}
}

func replay(completed *pb.Completed) *Done {
	return &Done{
		Response: Response{Body: completed.GetResponse(), Code: completed.GetResponseCode(), ContentType: completed.GetContentType()},
		Replayed: true,
		Attempt:  completed.GetAttempt(),
	}
}

// ending is how an acquired attempt ends: Complete with a response, or
// Abort with what the record should say and the error the caller gets.
type ending struct {
	complete       *Response
	reconciled     bool
	reason         string
	outcomeUnknown bool
	kind           Kind
	cause          error
}

func aborting(reason string, unknown bool, cause error) ending {
	switch marker := cause.(type) {
	case *retryable:
		cause = marker.err
	case *outcomeUnknown:
		cause = marker.err
	}
	kind := ErrRetryable
	if unknown {
		// The caller's error kind always says what the record says.
		kind = ErrOutcomeUnknown
	}
	return ending{reason: reason, outcomeUnknown: unknown, kind: kind, cause: cause}
}

// runAttempt runs the reconcile hook (when due) and the operation in one
// acquired attempt, with heartbeats. It returns the response to store, the
// lease still held; any other ending aborts the lease here.
func (c *Client) runAttempt(ctx context.Context, s *settings, key string, lease *pb.Acquired, operation Operation) (Done, error) {
	attempt := Attempt{DownstreamKey: lease.GetDownstreamKey(), Number: lease.GetAttempt()}
	if previous := lease.GetPrevious(); previous != nil {
		attempt.Previous = &PreviousAttempt{
			Number:         previous.GetAttempt(),
			AbortedBy:      previous.GetAbortedBy(),
			AbortReason:    previous.GetAbortReason(),
			OutcomeUnknown: previous.GetOutcomeUnknown(),
		}
		if previous.GetEndedAt() != nil {
			attempt.Previous.EndedAt = previous.GetEndedAt().AsTime()
		}
	}
	token := lease.GetLeaseToken()
	// Storing the outcome must not depend on the caller still waiting for
	// it; each RPC keeps its own timeout.
	detached := context.WithoutCancel(ctx)

	beats, stopBeats := context.WithCancel(ctx)
	var running sync.WaitGroup
	running.Add(1)
	go func() {
		defer running.Done()
		c.heartbeats(beats, s, key, token)
	}()
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			stopBeats()
			running.Wait()
		}
	}
	// Runs while a panic (or runtime.Goexit) from the operation or the hook
	// unwinds, without recovering it: the panic goes on with its own stack.
	ended := false
	defer func() {
		stop()
		if !ended {
			c.abort(detached, s, key, token, "the operation panicked", true)
		}
	}()
	end := c.decide(ctx, s, attempt, operation)
	stop()
	ended = true

	if end.complete == nil {
		c.abort(detached, s, key, token, end.reason, end.outcomeUnknown)
		return Done{}, &Error{Kind: end.kind, Key: key, Attempt: attempt.Number, Err: end.cause}
	}
	return Done{Response: *end.complete, Reconciled: end.reconciled, Attempt: attempt.Number}, nil
}

// store completes the lease with result's response. lost is the LEASE_LOST
// error when Complete found the lease expired or released; any other
// failure aborts the lease as outcome-unknown.
func (c *Client) store(ctx context.Context, s *settings, key, token string, result Done) (lost error, err error) {
	// Storing the outcome must not depend on the caller still waiting for
	// it; each RPC keeps its own timeout.
	detached := context.WithoutCancel(ctx)
	response := result.Response
	if check := validateResponse(response); check != nil {
		c.abort(detached, s, key, token, "the operation's response cannot be stored", true)
		return nil, &Error{Kind: ErrOutcomeUnknown, Key: key, Attempt: result.Attempt,
			Err: &Error{Kind: ErrInvalidArgument, Key: key, Attempt: result.Attempt, Err: check}}
	}
	_, err = call(detached, c, s, s.rpcTimeout, c.stub.Complete, &pb.CompleteRequest{
		Namespace:    c.namespace,
		Key:          key,
		LeaseToken:   token,
		Response:     response.Body,
		ResponseCode: response.Code,
		ContentType:  response.ContentType,
	})
	switch {
	case err == nil:
		return nil, nil
	case reason(err) == "LEASE_LOST":
		return err, nil
	default:
		// It happened (or the provider holds it) but is not stored: end the
		// lease as outcome-unknown so the next attempt reconciles.
		c.abort(detached, s, key, token, "the outcome could not be stored", true)
		return nil, rpcFailure(ctx, ErrOutcomeUnknown, key, result.Attempt, err)
	}
}

// decide runs the reconcile hook (when due) and the operation, and says how
// the attempt ends.
func (c *Client) decide(ctx context.Context, s *settings, attempt Attempt, operation Operation) ending {
	// Whether attempt - 1 may have done it and nobody has checked.
	unresolved := attempt.Previous != nil && attempt.Previous.OutcomeUnknown
	if unresolved && s.reconcile != nil {
		found, err := s.reconcile(ctx, attempt)
		var final *finalFailure
		switch {
		case errors.As(err, &final):
			return ending{complete: &final.response, reconciled: true}
		case err != nil:
			return aborting("reconcile failed", true, err)
		case found != nil:
			return ending{complete: found, reconciled: true}
		}
		unresolved = false
	}
	if err := ctx.Err(); err != nil {
		return aborting("the caller's context ended before the operation ran", unresolved, err)
	}
	response, err := operation(ctx, attempt)
	var (
		unknown *outcomeUnknown
		retry   *retryable
		final   *finalFailure
	)
	switch {
	case err == nil:
		return ending{complete: &response}
	case errors.As(err, &unknown):
		return aborting("outcome unknown", true, err)
	case errors.As(err, &retry) && unresolved:
		// Nothing happened here, but an unreconciled earlier attempt may
		// still have: keep the record saying so, or the attempt after this
		// one would skip its reconcile hook.
		return aborting("retryable failure; the previous outcome is unknown", true, err)
	case errors.As(err, &retry):
		return aborting("retryable failure", false, err)
	case errors.As(err, &final):
		return ending{complete: &final.response}
	default:
		// The reason stays generic: error text may carry payment details.
		return aborting("the operation failed with an unclassified error", true, err)
	}
}

// heartbeats renews the lease every third of its TTL until ctx ends. A lost
// lease stops them; Complete will report it.
func (c *Client) heartbeats(ctx context.Context, s *settings, key, token string) {
	every := s.leaseTTL / 3
	ticker := time.NewTicker(every)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		_, err := call(ctx, c, s, min(s.rpcTimeout, every), c.stub.Heartbeat, &pb.HeartbeatRequest{
			Namespace:  c.namespace,
			Key:        key,
			LeaseToken: token,
			LeaseTtl:   durationpb.New(s.leaseTTL),
		})
		if code := status.Code(err); code == codes.FailedPrecondition || code == codes.NotFound {
			return
		}
	}
}

// abort ends the lease. Its failure is not reported: LEASE_LOST means the
// lease already ended, and if idemd is unreachable the lease expires by
// itself, which idemd records as outcome-unknown anyway.
func (c *Client) abort(ctx context.Context, s *settings, key, token, reason string, outcomeUnknown bool) {
	_, _ = call(ctx, c, s, s.rpcTimeout, c.stub.Abort, &pb.AbortRequest{
		Namespace:      c.namespace,
		Key:            key,
		LeaseToken:     token,
		Reason:         reason,
		OutcomeUnknown: outcomeUnknown,
	})
}
