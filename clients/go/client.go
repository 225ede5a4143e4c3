package idemd

import (
	"context"
	"crypto/tls"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"google.golang.org/genproto/googleapis/rpc/errdetails"

	pb "github.com/idemd/idemd/clients/go/idemdv1"
)

// Client calls idemd for one namespace. It is safe for concurrent use; make
// one per process and namespace and Close it at shutdown.
type Client struct {
	conn      *grpc.ClientConn // nil when the caller owns the connection
	stub      pb.IdempotencyClient
	namespace string
	token     string
	defaults  settings
}

// settings are the knobs of one RunOnce call: the client's defaults with the
// call's own options applied on top.
type settings struct {
	leaseTTL         time.Duration
	retention        time.Duration
	wait             time.Duration
	inProgressBudget time.Duration
	rpcRetries       int
	rpcTimeout       time.Duration
	reconcile        ReconcileFunc
	finalError       func(Response) error
}

type clientConfig struct {
	run         settings
	token       string
	credentials credentials.TransportCredentials
	dial        []grpc.DialOption
}

// Option configures New. Every Setting is an Option too.
type Option interface{ applyClient(*clientConfig) }

// RunOption configures one RunOnce call. Every Setting is a RunOption too.
type RunOption interface{ applyRun(*settings) }

// Setting is a knob that New takes as the default for every call and
// RunOnce takes for that call alone.
type Setting func(*settings)

func (s Setting) applyClient(c *clientConfig) { s(&c.run) }
func (s Setting) applyRun(r *settings)        { s(r) }

type clientOption func(*clientConfig)

func (o clientOption) applyClient(c *clientConfig) { o(c) }

type runOption func(*settings)

func (o runOption) applyRun(r *settings) { o(r) }

// WithLeaseTTL sets how long each attempt owns the key (1 s to 1 h; default
// 30 s). Heartbeats renew it every third of it while the operation runs, so
// it bounds how long a crashed caller blocks the key, not how long the
// operation may take.
func WithLeaseTTL(ttl time.Duration) Setting { return func(s *settings) { s.leaseTTL = ttl } }

// WithRetention sets how long the outcome is kept and replayed (default 0:
// the server's default, 24 h; the server accepts its configured range,
// [24 h, 30 d] unless changed). Make it longer than your callers' retry
// window.
func WithRetention(retention time.Duration) Setting {
	return func(s *settings) { s.retention = retention }
}

// WithWait sets how long one Begin waits server-side for a concurrent
// attempt on the same key to finish (0 to 60 s; default 5 s).
func WithWait(wait time.Duration) Setting { return func(s *settings) { s.wait = wait } }

// WithInProgressBudget sets how long RunOnce keeps waiting while another
// attempt holds the key before it returns ErrInProgress (default 60 s). The
// context's deadline, when sooner, wins.
func WithInProgressBudget(budget time.Duration) Setting {
	return func(s *settings) { s.inProgressBudget = budget }
}

// WithRPCRetries sets how many times one RPC is retried on UNAVAILABLE and
// DEADLINE_EXCEEDED (default 5), with jittered exponential backoff.
func WithRPCRetries(retries int) Setting { return func(s *settings) { s.rpcRetries = retries } }

// WithRPCTimeout sets the deadline of one RPC (default 5 s; Begin adds its
// wait to it).
func WithRPCTimeout(timeout time.Duration) Setting {
	return func(s *settings) { s.rpcTimeout = timeout }
}

// WithFinalError turns a stored final failure back into the caller's own
// error type, for a fresh run and for every replay alike (the way Stripe's
// SDKs re-raise a replayed decline as a card error). decode sees every
// outcome: it returns nil for a success and the error for a final failure,
// usually by its Code. RunOnce then returns the Done and an *Error of kind
// ErrFinal wrapping that error, so errors.As finds the caller's type.
func WithFinalError(decode func(Response) error) Setting {
	return func(s *settings) { s.finalError = decode }
}

// WithReconcile sets the hook for a provider that does not deduplicate on
// downstream_key; see ReconcileFunc.
func WithReconcile(hook ReconcileFunc) RunOption {
	return runOption(func(s *settings) { s.reconcile = hook })
}

// WithToken sends "authorization: Bearer <token>" on every call, for an
// idemd running with a tokens file.
func WithToken(token string) Option { return clientOption(func(c *clientConfig) { c.token = token }) }

// WithTransportCredentials sets TLS (credentials.NewTLS(...)). Without it,
// "https://" addresses use TLS with the system's roots and the others
// connect in plain text.
func WithTransportCredentials(creds credentials.TransportCredentials) Option {
	return clientOption(func(c *clientConfig) { c.credentials = creds })
}

// WithDialOptions adds gRPC dial options (interceptors, keepalive, a custom
// dialer) to the connection New makes.
func WithDialOptions(options ...grpc.DialOption) Option {
	return clientOption(func(c *clientConfig) { c.dial = append(c.dial, options...) })
}

func defaultSettings() settings {
	return settings{
		leaseTTL:         30 * time.Second,
		wait:             5 * time.Second,
		inProgressBudget: 60 * time.Second,
		rpcRetries:       5,
		rpcTimeout:       5 * time.Second,
	}
}

// New connects (lazily) to idemd at addr, "host:port", "http://host:port"
// or "https://host:port", for namespace (1-64 characters of [a-z0-9._-]).
// An invalid namespace or option is an *Error of kind ErrInvalidArgument.
func New(addr, namespace string, options ...Option) (*Client, error) {
	config := clientConfig{run: defaultSettings()}
	for _, option := range options {
		option.applyClient(&config)
	}
	target, useTLS := addr, false
	switch {
	case strings.HasPrefix(addr, "http://"):
		target = strings.TrimPrefix(addr, "http://")
	case strings.HasPrefix(addr, "https://"):
		target, useTLS = strings.TrimPrefix(addr, "https://"), true
	}
	target = strings.TrimSuffix(target, "/")
	if target == "" || strings.Contains(target, "/") {
		return nil, invalid("", "address %q: want host:port, http://host:port or https://host:port", addr)
	}
	if err := checkClient(namespace, &config.run); err != nil {
		return nil, err
	}
	creds := config.credentials
	if creds == nil && useTLS {
		creds = credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS12})
	}
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	dial := append([]grpc.DialOption{grpc.WithTransportCredentials(creds)}, config.dial...)
	conn, err := grpc.NewClient(target, dial...)
	if err != nil {
		return nil, &Error{Kind: ErrInvalidArgument, Err: fmt.Errorf("address %q: %w", addr, err)}
	}
	return &Client{conn: conn, stub: pb.NewIdempotencyClient(conn), namespace: namespace, token: config.token, defaults: config.run}, nil
}

// NewFromConn uses a connection the caller made and owns (Close does not
// close it). Dial and credential options are ignored.
func NewFromConn(conn grpc.ClientConnInterface, namespace string, options ...Option) (*Client, error) {
	config := clientConfig{run: defaultSettings()}
	for _, option := range options {
		option.applyClient(&config)
	}
	if err := checkClient(namespace, &config.run); err != nil {
		return nil, err
	}
	return &Client{stub: pb.NewIdempotencyClient(conn), namespace: namespace, token: config.token, defaults: config.run}, nil
}

func checkClient(namespace string, s *settings) error {
	if err := validateNamespace(namespace); err != nil {
		return &Error{Kind: ErrInvalidArgument, Err: err}
	}
	if err := validateSettings(s); err != nil {
		return &Error{Kind: ErrInvalidArgument, Err: err}
	}
	return nil
}

// Close closes the connection New made.
func (c *Client) Close() error {
	if c.conn == nil {
		return nil
	}
	return c.conn.Close()
}

// Namespace is the namespace every call of this client uses.
func (c *Client) Namespace() string { return c.namespace }

// Stub is the generated client, for calls RunOnce does not cover (Lookup).
func (c *Client) Stub() pb.IdempotencyClient { return c.stub }

// reason is the google.rpc.ErrorInfo reason of an idemd error, if any.
func reason(err error) string {
	st, ok := status.FromError(err)
	if !ok {
		return ""
	}
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			return info.GetReason()
		}
	}
	return ""
}

func retryableCode(err error) bool {
	code := status.Code(err)
	return code == codes.Unavailable || code == codes.DeadlineExceeded
}

// jitter spreads retries ±50 % so that callers retrying together do not
// move in lockstep.
func jitter(d time.Duration) time.Duration {
	return time.Duration(float64(d) * (0.5 + rand.Float64()))
}

// sleep waits d or until ctx ends, whichever is first.
func sleep(ctx context.Context, d time.Duration) error {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// call runs one RPC with its own deadline, retrying UNAVAILABLE and
// DEADLINE_EXCEEDED up to s.rpcRetries times. A request is retried as is:
// Begin with the same attempt nonce gets the same lease back, and Complete,
// Abort and Heartbeat are idempotent for the same lease token.
func call[Req, Resp any](ctx context.Context, c *Client, s *settings, timeout time.Duration,
	rpc func(context.Context, Req, ...grpc.CallOption) (Resp, error), request Req) (Resp, error) {
	if c.token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.token)
	}
	backoff := 50 * time.Millisecond
	for tries := 0; ; tries++ {
		callCtx, cancel := context.WithTimeout(ctx, timeout)
		response, err := rpc(callCtx, request)
		cancel()
		// The caller's own deadline or cancellation is not idemd's failure.
		if err == nil || ctx.Err() != nil || !retryableCode(err) || tries >= s.rpcRetries {
			return response, err
		}
		if sleepErr := sleep(ctx, jitter(backoff)); sleepErr != nil {
			return response, err
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}
