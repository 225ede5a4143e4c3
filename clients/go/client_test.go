package idemd_test

// Behaviours beyond the shared scenarios: the lease always ends, the context
// is respected, bad input fails before any call, and the knobs reach idemd.

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	idemd "github.com/idemd/idemd/clients/go"
	pb "github.com/idemd/idemd/clients/go/idemdv1"
)

// assertAbortedAsUnknown checks that the attempt ended at once (not left to
// the lease's expiry) and says its outcome is unknown.
func assertAbortedAsUnknown(t *testing.T, key string) {
	t.Helper()
	record := lookup(t, key)
	if record.GetState() != pb.State_STATE_ABORTED || !record.GetOutcomeUnknown() || record.GetAbortedBy() != pb.AbortedBy_ABORTED_BY_CALLER {
		t.Fatalf("want the lease aborted by the caller as outcome-unknown, got %v", record)
	}
}

func TestUnclassifiedErrorNeverLeavesTheLeaseHeld(t *testing.T) {
	client, key := newClient(t, idemd.WithLeaseTTL(time.Hour)), newKey(t)
	bug := errors.New("json: unsupported type")
	_, err := client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		return idemd.Response{}, bug
	})
	assertOnlyKind(t, err, idemd.ErrOutcomeUnknown)
	if !errors.Is(err, bug) {
		t.Fatalf("the cause is lost: %v", err)
	}
	assertAbortedAsUnknown(t, key)

	// A provider's own gRPC error is the operation's cause, not idemd's code.
	key = newKey(t)
	_, err = client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		return idemd.Response{}, status.Error(codes.Unavailable, "provider: connection reset")
	})
	assertOnlyKind(t, err, idemd.ErrOutcomeUnknown)
	var e *idemd.Error
	if errors.As(err, &e); e.Code != codes.OK || e.Reason != "" || status.Code(err) != codes.Unavailable {
		t.Fatalf("error %+v", e)
	}
	assertAbortedAsUnknown(t, key)
}

func TestPanicNeverLeavesTheLeaseHeld(t *testing.T) {
	client, key := newClient(t, idemd.WithLeaseTTL(time.Hour)), newKey(t)
	recovered := func() (value any) {
		defer func() { value = recover() }()
		_, _ = client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
			panic("nil map in the payment code")
		})
		return nil
	}()
	if recovered != "nil map in the payment code" {
		t.Fatalf("the panic was not passed on: %v", recovered)
	}
	assertAbortedAsUnknown(t, key)
	// The next call is not blocked by the hour-long lease.
	done, err := client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		return ok(`{}`), nil
	})
	if err != nil || done.Attempt != 2 {
		t.Fatalf("after the panic: %+v, %v", done, err)
	}
}

func TestRetryableAfterAnUnreconciledUnknownOutcomeStaysUnknown(t *testing.T) {
	client, key := newClient(t), newKey(t)
	_, err := client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		return idemd.Response{}, idemd.OutcomeUnknown(errors.New("timeout"))
	})
	assertOnlyKind(t, err, idemd.ErrOutcomeUnknown)
	_, err = client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		return idemd.Response{}, idemd.Retryable(errors.New("503"))
	})
	// Attempt 1 may still have charged: the record and the error say so.
	assertOnlyKind(t, err, idemd.ErrOutcomeUnknown)
	assertAbortedAsUnknown(t, key)
}

func TestContextIsRespected(t *testing.T) {
	t.Run("cancelled while waiting on another attempt", func(t *testing.T) {
		key := newKey(t)
		holding, finish := make(chan struct{}), make(chan struct{})
		holder := newClient(t)
		held := make(chan error, 1)
		go func() {
			_, err := holder.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
				close(holding)
				<-finish
				return ok(`{}`), nil
			})
			held <- err
		}()
		<-holding
		defer func() {
			close(finish)
			if err := <-held; err != nil {
				t.Error(err)
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := newClient(t, idemd.WithWait(10*time.Second)).RunOnce(ctx, key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
			t.Error("ran while another attempt held the key")
			return ok(`{}`), nil
		})
		if elapsed := time.Since(start); elapsed > 3*time.Second {
			t.Fatalf("returned %v after the context's deadline", elapsed)
		}
		if !errors.Is(err, context.DeadlineExceeded) || kindOf(err) != idemd.ErrRPC {
			t.Fatalf("want ErrRPC wrapping context.DeadlineExceeded, got %v", err)
		}
	})

	t.Run("deadline while the operation runs", func(t *testing.T) {
		client, key := newClient(t, idemd.WithLeaseTTL(time.Hour)), newKey(t)
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		_, err := client.RunOnce(ctx, key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
			<-ctx.Done()
			return idemd.Response{}, ctx.Err()
		})
		assertOnlyKind(t, err, idemd.ErrOutcomeUnknown)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("the cause is lost: %v", err)
		}
		// Aborted although the caller's context had ended.
		assertAbortedAsUnknown(t, key)
	})

	t.Run("an outcome is stored after the context ended", func(t *testing.T) {
		client, key := newClient(t), newKey(t)
		ctx, cancel := context.WithCancel(context.Background())
		done, err := client.RunOnce(ctx, key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
			cancel()
			return ok(`{"charge":"ch_late"}`), nil
		})
		if err != nil || done.Attempt != 1 {
			t.Fatalf("%+v, %v", done, err)
		}
		if record := lookup(t, key); record.GetState() != pb.State_STATE_COMPLETED {
			t.Fatalf("record %v", record)
		}
	})

	t.Run("already cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, err := newClient(t).RunOnce(ctx, newKey(t), fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
			t.Error("ran with a cancelled context")
			return ok(`{}`), nil
		})
		if !errors.Is(err, context.Canceled) || kindOf(err) != idemd.ErrRPC {
			t.Fatalf("want ErrRPC wrapping context.Canceled, got %v", err)
		}
	})
}

func TestInvalidArgumentsAreRefusedBeforeAnyCall(t *testing.T) {
	var calls atomic.Int32
	count := grpc.WithUnaryInterceptor(func(ctx context.Context, method string, request, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, options ...grpc.CallOption) error {
		calls.Add(1)
		return invoker(ctx, method, request, reply, cc, options...)
	})
	for _, bad := range []struct {
		addr, namespace string
		options         []idemd.Option
	}{
		{server.addr, "", nil},
		{server.addr, "Payments", nil},
		{server.addr, strings.Repeat("a", 65), nil},
		{server.addr, "pay ments", nil},
		{server.addr, "payments", []idemd.Option{idemd.WithLeaseTTL(0)}},
		{server.addr, "payments", []idemd.Option{idemd.WithLeaseTTL(2 * time.Hour)}},
		{server.addr, "payments", []idemd.Option{idemd.WithWait(2 * time.Minute)}},
		{server.addr, "payments", []idemd.Option{idemd.WithRetention(-time.Hour)}},
		{server.addr, "payments", []idemd.Option{idemd.WithRPCTimeout(0)}},
		{"", "payments", nil},
		{"ftp://idemd:50051", "payments", nil},
	} {
		_, err := idemd.New(bad.addr, bad.namespace, bad.options...)
		assertOnlyKind(t, err, idemd.ErrInvalidArgument)
	}

	client := newClient(t, idemd.WithDialOptions(count))
	never := func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		t.Error("the operation ran")
		return ok(`{}`), nil
	}
	for _, bad := range []struct {
		key         string
		fingerprint []byte
		options     []idemd.RunOption
	}{
		{"", nil, nil},
		{strings.Repeat("k", 256), nil, nil},
		{"order\x00", nil, nil},
		{"order\u0085", nil, nil},
		{"order\xff", nil, nil},
		{"order", make([]byte, 65), nil},
		{"order", nil, []idemd.RunOption{idemd.WithLeaseTTL(500 * time.Millisecond)}},
	} {
		_, err := client.RunOnce(context.Background(), bad.key, bad.fingerprint, never, bad.options...)
		assertOnlyKind(t, err, idemd.ErrInvalidArgument)
	}
	_, err := client.RunOnce(context.Background(), "order", nil, nil)
	assertOnlyKind(t, err, idemd.ErrInvalidArgument)
	if calls.Load() != 0 {
		t.Fatalf("%d RPCs for invalid arguments", calls.Load())
	}
	// 255 bytes of key and 64 of fingerprint are allowed.
	long := strings.Repeat("k", 255)
	if _, err := client.RunOnce(context.Background(), long, make([]byte, 64), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		return ok(`{}`), nil
	}); err != nil {
		t.Fatal(err)
	}
}

func TestUnstorableResponseIsAbortedAsUnknown(t *testing.T) {
	client, key := newClient(t, idemd.WithLeaseTTL(time.Hour)), newKey(t)
	_, err := client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		return idemd.Response{Body: []byte(`{}`), Code: 201, ContentType: "application/json\n"}, nil
	})
	// The provider was called: the caller learns that, and why.
	if kindOf(err) != idemd.ErrOutcomeUnknown || !errors.Is(err, idemd.ErrInvalidArgument) {
		t.Fatalf("want ErrOutcomeUnknown caused by ErrInvalidArgument, got %v", err)
	}
	assertAbortedAsUnknown(t, key)
}

func TestAddressesWithAndWithoutScheme(t *testing.T) {
	for _, addr := range []string{server.addr, "http://" + server.addr, "http://" + server.addr + "/"} {
		client, err := idemd.New(addr, namespace)
		if err != nil {
			t.Fatal(addr, err)
		}
		if _, err := client.RunOnce(context.Background(), newKey(t), nil, func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
			return ok(`{}`), nil
		}); err != nil {
			t.Fatal(addr, err)
		}
		client.Close()
	}
}

func TestRetentionAndLeaseTTLReachIdemd(t *testing.T) {
	client, key := newClient(t, idemd.WithRetention(72*time.Hour)), newKey(t)
	var during *pb.Record
	_, err := client.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		during = lookup(t, key)
		return ok(`{}`), nil
	}, idemd.WithLeaseTTL(20*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	// This call's 20 s overrides the client's 2 s.
	if lease := during.GetLeaseExpiresAt().AsTime().Sub(during.GetCreatedAt().AsTime()); lease < 19*time.Second || lease > 21*time.Second {
		t.Fatalf("lease of %v", lease)
	}
	record := lookup(t, key)
	if kept := record.GetExpiresAt().AsTime().Sub(record.GetCompletedAt().AsTime()); kept != 72*time.Hour {
		t.Fatalf("kept for %v after completion", kept)
	}

	// A retention outside the server's range is idemd's INVALID_ARGUMENT.
	_, err = client.RunOnce(context.Background(), newKey(t), nil, func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		t.Error("ran with a refused retention")
		return ok(`{}`), nil
	}, idemd.WithRetention(time.Hour))
	assertOnlyKind(t, err, idemd.ErrInvalidArgument)
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("want idemd's INVALID_ARGUMENT, got %v", err)
	}
}

func TestInProgressBudgetRunsOut(t *testing.T) {
	key := newKey(t)
	holding, finish := make(chan struct{}), make(chan struct{})
	holder := newClient(t)
	held := make(chan error, 1)
	go func() {
		_, err := holder.RunOnce(context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
			close(holding)
			<-finish
			return ok(`{}`), nil
		})
		held <- err
	}()
	<-holding
	start := time.Now()
	_, err := newClient(t, idemd.WithWait(200*time.Millisecond), idemd.WithInProgressBudget(600*time.Millisecond)).RunOnce(
		context.Background(), key, fp("1000"), func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
			t.Error("ran while another attempt held the key")
			return ok(`{}`), nil
		})
	elapsed := time.Since(start)
	close(finish)
	if err := <-held; err != nil {
		t.Fatal(err)
	}
	assertOnlyKind(t, err, idemd.ErrInProgress)
	if elapsed < 600*time.Millisecond || elapsed > 3*time.Second {
		t.Fatalf("gave up after %v with a 600 ms budget", elapsed)
	}
}
