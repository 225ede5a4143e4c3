package idemd_test

// The client's tests run against a real idemd that TestMain starts from
// IDEMD_BIN (a built `idemd` binary; default ../../target/debug/idemd) on a
// free loopback port with a fresh SQLite database.

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	idemd "github.com/idemd/idemd/clients/go"
	pb "github.com/idemd/idemd/clients/go/idemdv1"
)

const namespace = "go-payments"

// server is the idemd every test shares; its keys never repeat.
var server *idemdProcess

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "idemd-go-client-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	server, err = startIdemd(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer server.stop()
	// The README example reads its address from the environment.
	os.Setenv("IDEMD_ADDR", server.addr)
	return m.Run()
}

type idemdProcess struct {
	addr   string
	cmd    *exec.Cmd
	conn   *grpc.ClientConn
	admin  pb.AdminClient
	stub   pb.IdempotencyClient
	output *lockedBuffer
	exited chan struct{}
}

type lockedBuffer struct {
	mu   sync.Mutex
	text strings.Builder
}

func (b *lockedBuffer) add(line string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.text.WriteString(line + "\n")
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.text.String()
}

func freeAddr() (string, error) {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer listener.Close()
	return listener.Addr().String(), nil
}

// startIdemd starts `idemd serve` and returns once it logs "idemd
// listening", which it does after binding the port.
func startIdemd(dir string) (*idemdProcess, error) {
	binary := os.Getenv("IDEMD_BIN")
	if binary == "" {
		binary = filepath.Join("..", "..", "target", "debug", "idemd")
	}
	if _, err := os.Stat(binary); err != nil {
		return nil, fmt.Errorf("no idemd binary at %s (set IDEMD_BIN to a built idemd): %w", binary, err)
	}
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	database, err := os.MkdirTemp(dir, "db-")
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(binary, "serve", "--listen", addr, "--metrics-listen", "127.0.0.1:0",
		"--database-url", "sqlite://"+filepath.Join(database, "idemd.db"), "--reaper-interval", "100ms")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &idemdProcess{addr: addr, cmd: cmd, output: &lockedBuffer{}, exited: make(chan struct{})}
	listening := make(chan struct{})
	go func() {
		// Keep reading to the end, or idemd would block on a full pipe.
		scanner := bufio.NewScanner(stderr)
		seen := false
		for scanner.Scan() {
			p.output.add(scanner.Text())
			if !seen && strings.Contains(scanner.Text(), "idemd listening") {
				seen = true
				close(listening)
			}
		}
		_, _ = io.Copy(io.Discard, stderr)
		_ = cmd.Wait()
		close(p.exited)
	}()
	select {
	case <-listening:
	case <-p.exited:
		return nil, fmt.Errorf("idemd exited before listening:\n%s", p.output)
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		return nil, fmt.Errorf("idemd did not log \"idemd listening\" within 30 s:\n%s", p.output)
	}
	p.conn, err = grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		p.stop()
		return nil, err
	}
	p.admin, p.stub = pb.NewAdminClient(p.conn), pb.NewIdempotencyClient(p.conn)
	return p, nil
}

func (p *idemdProcess) stop() {
	if p.conn != nil {
		p.conn.Close()
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// newClient is a client of the shared server with short leases and waits,
// so that the tests that wait on them stay short.
func newClient(t *testing.T, options ...idemd.Option) *idemd.Client {
	t.Helper()
	defaults := []idemd.Option{idemd.WithLeaseTTL(2 * time.Second), idemd.WithWait(2 * time.Second), idemd.WithInProgressBudget(15 * time.Second)}
	client, err := idemd.New(server.addr, namespace, append(defaults, options...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return client
}

func newKey(t *testing.T) string {
	var bytes [8]byte
	_, _ = rand.Read(bytes[:])
	return "order-" + strings.ToLower(t.Name()) + "-" + hex.EncodeToString(bytes[:])
}

func lookup(t *testing.T, key string) *pb.Record {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	response, err := server.stub.Lookup(ctx, &pb.LookupRequest{Namespace: namespace, Key: key})
	if err != nil {
		t.Fatalf("Lookup %s: %v", key, err)
	}
	return response.GetRecord()
}

func fp(amount string) []byte {
	return idemd.Fingerprint(map[string]string{"amount": amount, "currency": "EUR"})
}

func ok(body string) idemd.Response {
	return idemd.Response{Body: []byte(body), Code: 201, ContentType: "application/json"}
}

// counter counts an operation's runs from any goroutine.
type counter struct {
	mu   sync.Mutex
	runs []idemd.Attempt
}

func (c *counter) add(attempt idemd.Attempt) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.runs = append(c.runs, attempt)
	return len(c.runs)
}

func (c *counter) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.runs)
}

// kindOf is the Kind of an *idemd.Error, or 0.
func kindOf(err error) idemd.Kind {
	var e *idemd.Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return 0
}

var allKinds = []idemd.Kind{
	idemd.ErrInvalidArgument, idemd.ErrFingerprintMismatch, idemd.ErrInProgress, idemd.ErrLeaseLost,
	idemd.ErrRetryable, idemd.ErrOutcomeUnknown, idemd.ErrFinal, idemd.ErrRPC,
}

// assertOnlyKind checks that err is of kind want and of no other kind.
func assertOnlyKind(t *testing.T, err error, want idemd.Kind) {
	t.Helper()
	var e *idemd.Error
	if !errors.As(err, &e) {
		t.Fatalf("want an *idemd.Error of kind %v, got %T: %v", want, err, err)
	}
	for _, kind := range allKinds {
		if kind != want && errors.Is(err, kind) {
			t.Errorf("error %v is also %v", err, kind)
		}
	}
	if !errors.Is(err, want) || e.Kind != want {
		t.Fatalf("want kind %v, got %v (%v)", want, e.Kind, err)
	}
}
