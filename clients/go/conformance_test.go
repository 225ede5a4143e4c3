package idemd_test

// One test per scenario of clients/testdata/conformance.json, named after
// its id; TestEveryConformanceScenarioHasATest keeps the list and the tests
// in step.

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	idemd "github.com/idemd/idemd/clients/go"
	pb "github.com/idemd/idemd/clients/go/idemdv1"
)

func TestFirstRunStoresAndReplays(t *testing.T) {
	client, key, runs := newClient(t), newKey(t), &counter{}
	charge := func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		runs.add(attempt)
		return ok(`{"charge":"ch_1"}`), nil
	}
	first, err := client.RunOnce(context.Background(), key, fp("1000"), charge)
	if err != nil {
		t.Fatal(err)
	}
	if first.Replayed || first.Reconciled || first.Attempt != 1 || string(first.Response.Body) != `{"charge":"ch_1"}` {
		t.Fatalf("first run: %+v", first)
	}
	attempt := runs.runs[0]
	if attempt.Number != 1 || attempt.Previous != nil || !regexp.MustCompile(`^idk_[0-9a-f]{32}$`).MatchString(attempt.DownstreamKey) {
		t.Fatalf("the operation was told %+v", attempt)
	}
	second, err := client.RunOnce(context.Background(), key, fp("1000"), charge)
	if err != nil {
		t.Fatal(err)
	}
	if !second.Replayed || second.Attempt != 1 || !bytes.Equal(second.Response.Body, first.Response.Body) ||
		second.Response.Code != 201 || second.Response.ContentType != "application/json" {
		t.Fatalf("second run: %+v", second)
	}
	if runs.count() != 1 {
		t.Fatalf("the operation ran %d times", runs.count())
	}
	record := lookup(t, key)
	if record.GetState() != pb.State_STATE_COMPLETED || record.GetDownstreamKey() != attempt.DownstreamKey {
		t.Fatalf("record %v", record)
	}
}

func TestConcurrentDuplicateWaitsForTheStoredResponse(t *testing.T) {
	key, runs := newKey(t), &counter{}
	started, release := make(chan struct{}), make(chan struct{})
	charge := func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		if runs.add(attempt) == 1 {
			close(started)
		}
		<-release
		return ok(`{"charge":"ch_dup"}`), nil
	}
	type result struct {
		done idemd.Done
		err  error
	}
	holder, first := make(chan result, 1), newClient(t)
	go func() {
		done, err := first.RunOnce(context.Background(), key, fp("1000"), charge)
		holder <- result{done, err}
	}()
	<-started
	// A wait longer than the holder takes: one Begin waits server-side and
	// is woken by the holder's Complete.
	waiter, second := make(chan result, 1), newClient(t, idemd.WithWait(10*time.Second))
	go func() {
		done, err := second.RunOnce(context.Background(), key, fp("1000"), charge)
		waiter <- result{done, err}
	}()
	time.Sleep(300 * time.Millisecond)
	close(release)
	held, waited := <-holder, <-waiter
	if held.err != nil || waited.err != nil {
		t.Fatal(held.err, waited.err)
	}
	if held.done.Replayed || !waited.done.Replayed || string(waited.done.Response.Body) != `{"charge":"ch_dup"}` {
		t.Fatalf("holder %+v, waiter %+v", held.done, waited.done)
	}
	if runs.count() != 1 {
		t.Fatalf("the operation ran %d times", runs.count())
	}
}

// cardDeclined is the caller's own error type for a decline, as a payment
// SDK would have it.
type cardDeclined struct{ body string }

func (c *cardDeclined) Error() string { return "card declined: " + c.body }

func TestFinalFailureIsStoredAndReplayed(t *testing.T) {
	client, key, runs := newClient(t), newKey(t), &counter{}
	declined := idemd.Response{Body: []byte(`{"error":"card_declined"}`), Code: 402, ContentType: "application/json"}
	decline := func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		runs.add(attempt)
		return idemd.Response{}, idemd.Final(declined)
	}
	first, err := client.RunOnce(context.Background(), key, fp("1000"), decline)
	if err != nil {
		t.Fatal(err)
	}
	if first.Replayed || first.Response.Code != 402 || string(first.Response.Body) != string(declined.Body) {
		t.Fatalf("first run: %+v", first)
	}
	if record := lookup(t, key); record.GetState() != pb.State_STATE_COMPLETED || record.GetResponseCode() != 402 {
		t.Fatalf("record %v", record)
	}
	// Every later run gets the same final failure, as the caller's own
	// error type when asked for it.
	asError := idemd.WithFinalError(func(response idemd.Response) error {
		if response.Code == 402 {
			return &cardDeclined{string(response.Body)}
		}
		return nil
	})
	for range 2 {
		again, err := client.RunOnce(context.Background(), key, fp("1000"), decline, asError)
		var card *cardDeclined
		if !errors.As(err, &card) || card.body != `{"error":"card_declined"}` {
			t.Fatalf("want the replayed decline as *cardDeclined, got %v", err)
		}
		assertOnlyKind(t, err, idemd.ErrFinal)
		if !again.Replayed || again.Response.Code != 402 || again.Attempt != 1 {
			t.Fatalf("replay: %+v", again)
		}
	}
	if runs.count() != 1 {
		t.Fatalf("the operation ran %d times", runs.count())
	}
}

func TestRetryableFailureIsAbortedAndRerun(t *testing.T) {
	client, key, runs := newClient(t), newKey(t), &counter{}
	unavailable := errors.New("provider answered 503")
	_, err := client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		runs.add(attempt)
		return idemd.Response{}, idemd.Retryable(unavailable)
	})
	assertOnlyKind(t, err, idemd.ErrRetryable)
	if !errors.Is(err, unavailable) {
		t.Fatalf("the cause is lost: %v", err)
	}
	var e *idemd.Error
	if errors.As(err, &e); e.Attempt != 1 || e.Key != key {
		t.Fatalf("error fields: %+v", e)
	}
	record := lookup(t, key)
	if record.GetState() != pb.State_STATE_ABORTED || record.GetOutcomeUnknown() || record.GetAbortedBy() != pb.AbortedBy_ABORTED_BY_CALLER {
		t.Fatalf("record after a retryable failure: %v", record)
	}
	done, err := client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		runs.add(attempt)
		return ok(`{"charge":"ch_2"}`), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	second := runs.runs[1]
	if done.Attempt != 2 || done.Replayed || second.Number != 2 || second.Previous == nil ||
		second.Previous.Number != 1 || second.Previous.OutcomeUnknown || second.DownstreamKey != runs.runs[0].DownstreamKey {
		t.Fatalf("rerun: %+v, attempt %+v, previous %+v", done, second, second.Previous)
	}
}

func TestUnknownOutcomeIsAbortedAsUnknown(t *testing.T) {
	client, key, runs := newClient(t), newKey(t), &counter{}
	timeout := errors.New("provider did not answer within 10 s")
	_, err := client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		runs.add(attempt)
		return idemd.Response{}, idemd.OutcomeUnknown(timeout)
	})
	assertOnlyKind(t, err, idemd.ErrOutcomeUnknown)
	if !errors.Is(err, timeout) {
		t.Fatalf("the cause is lost: %v", err)
	}
	if record := lookup(t, key); record.GetState() != pb.State_STATE_ABORTED || !record.GetOutcomeUnknown() {
		t.Fatalf("record %v", record)
	}
	if _, err := client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		runs.add(attempt)
		return ok(`{}`), nil
	}); err != nil {
		t.Fatal(err)
	}
	previous := runs.runs[1].Previous
	if previous == nil || !previous.OutcomeUnknown || previous.Number != 1 ||
		previous.AbortedBy != pb.AbortedBy_ABORTED_BY_CALLER || previous.EndedAt.IsZero() {
		t.Fatalf("attempt 2 was told %+v", previous)
	}
}

func TestReconcileHookCompletesWithoutRunning(t *testing.T) {
	client := newClient(t)
	// Attempt 1 of a key times out at the provider (which charged).
	unknownFirst := func(t *testing.T, key string, hook idemd.RunOption) {
		t.Helper()
		_, err := client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
			return idemd.Response{}, idemd.OutcomeUnknown(errors.New("timeout after sending"))
		}, hook)
		assertOnlyKind(t, err, idemd.ErrOutcomeUnknown)
	}

	t.Run("found", func(t *testing.T) {
		key, runs, asked := newKey(t), &counter{}, &counter{}
		charged := ok(`{"charge":"ch_found"}`)
		hook := idemd.WithReconcile(func(ctx context.Context, attempt idemd.Attempt) (*idemd.Response, error) {
			asked.add(attempt)
			return &charged, nil
		})
		unknownFirst(t, key, hook)
		if asked.count() != 0 {
			t.Fatal("the hook ran on attempt 1")
		}
		done, err := client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
			runs.add(attempt)
			return ok(`{"charge":"ch_second"}`), nil
		}, hook)
		if err != nil {
			t.Fatal(err)
		}
		if !done.Reconciled || done.Replayed || done.Attempt != 2 || string(done.Response.Body) != `{"charge":"ch_found"}` {
			t.Fatalf("done %+v", done)
		}
		if runs.count() != 0 || asked.count() != 1 || !asked.runs[0].Previous.OutcomeUnknown {
			t.Fatalf("operation ran %d times, hook %d times", runs.count(), asked.count())
		}
		replayed, err := client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
			runs.add(attempt)
			return ok(`{}`), nil
		}, hook)
		if err != nil || !replayed.Replayed || string(replayed.Response.Body) != `{"charge":"ch_found"}` || runs.count() != 0 {
			t.Fatalf("after reconciling: %+v, %v", replayed, err)
		}
	})

	t.Run("none", func(t *testing.T) {
		key, runs, asked := newKey(t), &counter{}, &counter{}
		hook := idemd.WithReconcile(func(ctx context.Context, attempt idemd.Attempt) (*idemd.Response, error) {
			asked.add(attempt)
			return nil, nil
		})
		unknownFirst(t, key, hook)
		done, err := client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
			runs.add(attempt)
			return ok(`{"charge":"ch_ran"}`), nil
		}, hook)
		if err != nil {
			t.Fatal(err)
		}
		if done.Reconciled || done.Attempt != 2 || runs.count() != 1 || asked.count() != 1 {
			t.Fatalf("done %+v, operation ran %d times, hook %d times", done, runs.count(), asked.count())
		}
	})

	t.Run("hook fails", func(t *testing.T) {
		key, runs := newKey(t), &counter{}
		providerDown := errors.New("provider search unavailable")
		hook := idemd.WithReconcile(func(ctx context.Context, attempt idemd.Attempt) (*idemd.Response, error) {
			return nil, providerDown
		})
		unknownFirst(t, key, hook)
		_, err := client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
			runs.add(attempt)
			return ok(`{}`), nil
		}, hook)
		assertOnlyKind(t, err, idemd.ErrOutcomeUnknown)
		if !errors.Is(err, providerDown) || runs.count() != 0 {
			t.Fatalf("err %v, operation ran %d times", err, runs.count())
		}
		// The question is still open for the next attempt.
		if record := lookup(t, key); record.GetState() != pb.State_STATE_ABORTED || !record.GetOutcomeUnknown() || record.GetAttempt() != 2 {
			t.Fatalf("record %v", record)
		}
	})
}

func TestLostBeginReplyRetriedWithTheSameNonceGetsTheSameLease(t *testing.T) {
	type sent struct {
		nonce, token string
		attempt      uint32
	}
	var (
		mu     sync.Mutex
		begins []sent
	)
	// The first Begin reaches idemd, which acquires; its reply is then
	// dropped, as a broken connection would.
	loseFirstReply := func(ctx context.Context, method string, request, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, options ...grpc.CallOption) error {
		err := invoker(ctx, method, request, reply, cc, options...)
		if method != pb.Idempotency_Begin_FullMethodName || err != nil {
			return err
		}
		mu.Lock()
		defer mu.Unlock()
		begins = append(begins, sent{
			nonce:   request.(*pb.BeginRequest).GetAttemptNonce(),
			token:   reply.(*pb.BeginResponse).GetAcquired().GetLeaseToken(),
			attempt: reply.(*pb.BeginResponse).GetAcquired().GetAttempt(),
		})
		if len(begins) == 1 {
			return status.Error(codes.Unavailable, "reply lost on the way back")
		}
		return nil
	}
	client, key, runs := newClient(t, idemd.WithDialOptions(grpc.WithUnaryInterceptor(loseFirstReply))), newKey(t), &counter{}
	done, err := client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		runs.add(attempt)
		return ok(`{"charge":"ch_nonce"}`), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(begins) != 2 {
		t.Fatalf("want the lost Begin and its retry, got %d Begins", len(begins))
	}
	first, retry := begins[0], begins[1]
	if first.nonce == "" || retry.nonce != first.nonce || first.token == "" || retry.token != first.token || retry.attempt != 1 || first.attempt != 1 {
		t.Fatalf("lost Begin %+v, retried Begin %+v", first, retry)
	}
	if done.Attempt != 1 || runs.count() != 1 {
		t.Fatalf("done %+v, operation ran %d times", done, runs.count())
	}
	// The retried Begin's lease completed: no orphan lease, no attempt 2.
	if record := lookup(t, key); record.GetState() != pb.State_STATE_COMPLETED || record.GetAttempt() != 1 {
		t.Fatalf("record %v", record)
	}
}

func TestHeartbeatsKeepALongOperationAlive(t *testing.T) {
	var beats, afterwards int
	var mu sync.Mutex
	returned := false
	count := func(ctx context.Context, method string, request, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, options ...grpc.CallOption) error {
		if method == pb.Idempotency_Heartbeat_FullMethodName {
			mu.Lock()
			beats++
			if returned {
				afterwards++
			}
			mu.Unlock()
		}
		return invoker(ctx, method, request, reply, cc, options...)
	}
	client := newClient(t, idemd.WithLeaseTTL(time.Second), idemd.WithDialOptions(grpc.WithUnaryInterceptor(count)))
	key := newKey(t)
	var midway *pb.Record
	var busy error
	done, err := client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		time.Sleep(1800 * time.Millisecond)
		// Past the 1 s TTL (and the 100 ms reaper) the lease is still ours.
		midway = lookup(t, key)
		_, busy = newClient(t, idemd.WithWait(0), idemd.WithInProgressBudget(0)).RunOnce(ctx, key, fp("1000"),
			func(context.Context, idemd.Attempt) (idemd.Response, error) {
				return ok(`{"charge":"ch_intruder"}`), nil
			})
		time.Sleep(700 * time.Millisecond)
		return ok(`{"charge":"ch_long"}`), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	returned = true
	mu.Unlock()
	if midway.GetState() != pb.State_STATE_IN_PROGRESS || midway.GetAttempt() != 1 || !midway.GetLeaseExpiresAt().AsTime().After(time.Now()) {
		t.Fatalf("midway record %v", midway)
	}
	assertOnlyKind(t, busy, idemd.ErrInProgress)
	if done.Attempt != 1 || done.Replayed || string(done.Response.Body) != `{"charge":"ch_long"}` {
		t.Fatalf("done %+v", done)
	}
	if record := lookup(t, key); record.GetState() != pb.State_STATE_COMPLETED || record.GetAttempt() != 1 {
		t.Fatalf("record %v", record)
	}
	// The heartbeat goroutine ended with the call.
	time.Sleep(time.Second)
	mu.Lock()
	defer mu.Unlock()
	if beats < 2 || afterwards != 0 {
		t.Fatalf("%d heartbeats, %d after RunOnce returned", beats, afterwards)
	}
}

// release ends a running attempt as an operator would (Admin.Release), so
// the holder's Complete answers LEASE_LOST.
func release(t *testing.T, key string, attempt uint32) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := server.admin.Release(ctx, &pb.ReleaseRequest{
		Namespace: namespace, Key: key, Attempt: attempt, Reason: "test: taken over", OutcomeUnknown: true,
	}); err != nil {
		t.Fatal(err)
	}
}

func TestLeaseLostBeginsAgain(t *testing.T) {
	t.Run("replays the winner's result", func(t *testing.T) {
		key, runs := newKey(t), &counter{}
		taken, finish := make(chan struct{}), make(chan struct{})
		result := make(chan error, 1)
		var done idemd.Done
		loser := newClient(t)
		go func() {
			var err error
			done, err = loser.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
				runs.add(attempt)
				close(taken)
				<-finish
				return ok(`{"charge":"ch_loser"}`), nil
			})
			result <- err
		}()
		<-taken
		release(t, key, 1)
		winner, err := newClient(t).RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
			return ok(`{"charge":"ch_winner"}`), nil
		})
		if err != nil || winner.Attempt != 2 {
			t.Fatalf("winner %+v, %v", winner, err)
		}
		close(finish)
		if err := <-result; err != nil {
			t.Fatal(err)
		}
		if !done.Replayed || string(done.Response.Body) != `{"charge":"ch_winner"}` || done.Attempt != 2 || runs.count() != 1 {
			t.Fatalf("the loser got %+v after running %d times", done, runs.count())
		}
	})

	t.Run("stores the response it has under a new attempt", func(t *testing.T) {
		// Nobody else stored a result: Begin hands this call the record
		// again (attempt 2), and the response it already has is stored
		// there without running the operation again.
		key, runs := newKey(t), &counter{}
		done, err := newClient(t).RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
			runs.add(attempt)
			release(t, key, attempt.Number)
			return ok(`{"charge":"ch_mine"}`), nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if done.Attempt != 2 || done.Replayed || string(done.Response.Body) != `{"charge":"ch_mine"}` || runs.count() != 1 {
			t.Fatalf("done %+v after %d runs", done, runs.count())
		}
		record := lookup(t, key)
		if record.GetState() != pb.State_STATE_COMPLETED || record.GetAttempt() != 2 || string(record.GetResponse()) != `{"charge":"ch_mine"}` {
			t.Fatalf("stored %+v", record)
		}
	})

	t.Run("gives up when it keeps losing", func(t *testing.T) {
		// Every Complete finds its lease released just before it arrives.
		key, runs := newKey(t), &counter{}
		releaseFirst := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			if complete, isComplete := req.(*pb.CompleteRequest); isComplete {
				record := lookup(t, complete.GetKey())
				release(t, complete.GetKey(), record.GetAttempt())
			}
			return invoker(ctx, method, req, reply, cc, opts...)
		}
		begins := 0
		countBegins := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			if _, isBegin := req.(*pb.BeginRequest); isBegin {
				begins++
			}
			return invoker(ctx, method, req, reply, cc, opts...)
		}
		taken := newClient(t, idemd.WithDialOptions(grpc.WithChainUnaryInterceptor(releaseFirst, countBegins)))
		_, err := taken.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
			runs.add(attempt)
			return ok(`{}`), nil
		})
		assertOnlyKind(t, err, idemd.ErrLeaseLost)
		var e *idemd.Error
		if errors.As(err, &e); e.Reason != "LEASE_LOST" || e.Code != codes.FailedPrecondition || e.Attempt != 3 || runs.count() != 1 || begins != 3 {
			t.Fatalf("error %+v after %d runs and %d Begins", e, runs.count(), begins)
		}
	})
}

func TestFingerprintMismatchIsItsOwnError(t *testing.T) {
	client, key, runs := newClient(t), newKey(t), &counter{}
	charge := func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		runs.add(attempt)
		return ok(`{}`), nil
	}
	if _, err := client.RunOnce(context.Background(), key, fp("1000"), charge); err != nil {
		t.Fatal(err)
	}
	_, err := client.RunOnce(context.Background(), key, fp("9999"), charge)
	assertOnlyKind(t, err, idemd.ErrFingerprintMismatch)
	var e *idemd.Error
	errors.As(err, &e)
	if e.Reason != "FINGERPRINT_MISMATCH" || e.Code != codes.FailedPrecondition || status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("error %+v", e)
	}
	if runs.count() != 1 || !strings.Contains(err.Error(), key) {
		t.Fatalf("operation ran %d times; message %q", runs.count(), err)
	}
}

func TestUnavailableIsRetriedThenSurfaced(t *testing.T) {
	never := func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		t.Error("the operation ran without idemd")
		return ok(`{}`), nil
	}
	expectUnavailable := func(t *testing.T, addr string) {
		t.Helper()
		var begins int
		var mu sync.Mutex
		count := func(ctx context.Context, method string, request, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, options ...grpc.CallOption) error {
			mu.Lock()
			begins++
			mu.Unlock()
			return invoker(ctx, method, request, reply, cc, options...)
		}
		client, err := idemd.New(addr, namespace, idemd.WithRPCRetries(3), idemd.WithRPCTimeout(2*time.Second),
			idemd.WithDialOptions(grpc.WithUnaryInterceptor(count)))
		if err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		done, err := client.RunOnce(context.Background(), newKey(t), fp("1000"), never)
		assertOnlyKind(t, err, idemd.ErrRPC)
		if status.Code(err) != codes.Unavailable || done.Attempt != 0 || done.Response.Body != nil {
			t.Fatalf("want UNAVAILABLE and no outcome, got %v, %+v", err, done)
		}
		mu.Lock()
		defer mu.Unlock()
		if begins != 4 {
			t.Fatalf("want 1 Begin + 3 retries, got %d", begins)
		}
	}

	t.Run("unreachable address", func(t *testing.T) {
		addr, err := freeAddr()
		if err != nil {
			t.Fatal(err)
		}
		expectUnavailable(t, "http://"+addr)
	})

	t.Run("stopped server", func(t *testing.T) {
		own, err := startIdemd(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		client, err := idemd.New(own.addr, namespace)
		if err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		if _, err := client.RunOnce(context.Background(), newKey(t), fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
			return ok(`{}`), nil
		}); err != nil {
			t.Fatal(err)
		}
		own.stop()
		expectUnavailable(t, own.addr)
	})
}

func TestKeysAndFingerprintsMatchTheSharedVectors(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("..", "testdata", "vectors.json"))
	if err != nil {
		t.Fatal(err)
	}
	var vectors struct {
		EntityKeys []struct {
			Entity, Operation, Key string
		} `json:"entity_keys"`
		Fingerprints []struct {
			Fields    map[string]string `json:"fields"`
			SHA256Hex string            `json:"sha256_hex"`
		} `json:"fingerprints"`
	}
	if err := json.Unmarshal(raw, &vectors); err != nil {
		t.Fatal(err)
	}
	if len(vectors.EntityKeys) == 0 || len(vectors.Fingerprints) == 0 {
		t.Fatal("no vectors")
	}
	for _, c := range vectors.EntityKeys {
		if got := idemd.EntityKey(c.Entity, c.Operation); got != c.Key {
			t.Errorf("EntityKey(%q, %q) = %s, want %s", c.Entity, c.Operation, got, c.Key)
		}
	}
	for _, c := range vectors.Fingerprints {
		if got := hex.EncodeToString(idemd.Fingerprint(c.Fields)); got != c.SHA256Hex {
			t.Errorf("Fingerprint(%v) = %s, want %s", c.Fields, got, c.SHA256Hex)
		}
	}
	if bytes.Equal(idemd.Fingerprint(map[string]string{"a": "bc"}), idemd.Fingerprint(map[string]string{"ab": "c"})) {
		t.Error("concatenation collides")
	}
}

// TestEveryConformanceScenarioHasATest fails when a scenario of
// clients/testdata/conformance.json has no test named after it here.
func TestEveryConformanceScenarioHasATest(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("..", "testdata", "conformance.json"))
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Scenarios []struct{ ID string } `json:"scenarios"`
	}
	if err := json.Unmarshal(raw, &list); err != nil {
		t.Fatal(err)
	}
	source, err := os.ReadFile("conformance_test.go")
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Scenarios) == 0 {
		t.Fatal("no scenarios")
	}
	for _, scenario := range list.Scenarios {
		name := "Test"
		for _, word := range strings.Split(scenario.ID, "_") {
			name += strings.ToUpper(word[:1]) + word[1:]
		}
		if !strings.Contains(string(source), "func "+name+"(t *testing.T)") {
			t.Errorf("scenario %s has no test %s", scenario.ID, name)
		}
	}
}
