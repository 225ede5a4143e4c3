package idemd_test

// The example of clients/go/README.md, run against the test server with a
// fake provider; TestReadmeExampleIsThisExample keeps the two the same.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	idemd "github.com/idemd/idemd/clients/go"
)

// Order, provider and its errors stand for the caller's own code and its
// payment SDK.
type Order struct{ ID, Amount, Currency string }

type Charge struct {
	ID     string `json:"id"`
	Amount string `json:"amount"`
}

type DeclinedError struct{ Code string }

func (e *DeclinedError) Error() string { return "card declined: " + e.Code }

var ErrProviderTimeout = errors.New("provider: no answer within 10 s")

// fakeProvider deduplicates by idempotency key, as Stripe does.
type fakeProvider struct {
	mu      sync.Mutex
	charges map[string]Charge
}

func (p *fakeProvider) Charge(ctx context.Context, amount, currency, idempotencyKey string) (Charge, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if amount == "666" {
		return Charge{}, &DeclinedError{Code: "insufficient_funds"}
	}
	if charge, ok := p.charges[idempotencyKey]; ok {
		return charge, nil
	}
	charge := Charge{ID: fmt.Sprintf("ch_%d", len(p.charges)+1), Amount: amount}
	p.charges[idempotencyKey] = charge
	return charge, nil
}

// FindByMetadata is the provider's search, for the reconcile hook.
func (p *fakeProvider) FindByMetadata(ctx context.Context, field, value string) (*Charge, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if charge, ok := p.charges[value]; ok && field == "idempotency_key" {
		return &charge, nil
	}
	return nil, nil
}

func (c *Charge) JSON() []byte {
	body, _ := json.Marshal(c)
	return body
}

var provider = &fakeProvider{charges: map[string]Charge{}}

// README: begin
// ChargeOrder charges an order at most once, however often it is called.
func ChargeOrder(ctx context.Context, client *idemd.Client, order Order) (Charge, error) {
	key := idemd.EntityKey(order.ID, "charge")
	fp := idemd.Fingerprint(map[string]string{"amount": order.Amount, "currency": order.Currency})
	done, err := client.RunOnce(ctx, key, fp, func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		// The provider's idempotency key: a retry after a crash charges once.
		charge, err := provider.Charge(ctx, order.Amount, order.Currency, attempt.DownstreamKey)
		var declined *DeclinedError
		switch {
		case errors.As(err, &declined): // an answer: stored and replayed to every retry
			body, _ := json.Marshal(declined)
			return idemd.Response{}, idemd.Final(idemd.Response{Body: body, Code: 402, ContentType: "application/json"})
		case errors.Is(err, ErrProviderTimeout): // sent, no answer: it may have charged
			return idemd.Response{}, idemd.OutcomeUnknown(err)
		case err != nil: // refused (5xx, "idempotency key in use"): nothing happened
			return idemd.Response{}, idemd.Retryable(err)
		}
		body, err := json.Marshal(charge)
		return idemd.Response{Body: body, Code: 201, ContentType: "application/json"}, err
	}, idemd.WithFinalError(func(stored idemd.Response) error {
		// A replayed decline comes back as the same error type as the first.
		if stored.Code != 402 {
			return nil
		}
		declined := &DeclinedError{}
		if err := json.Unmarshal(stored.Body, declined); err != nil {
			return err
		}
		return declined
	}))
	if err != nil {
		return Charge{}, err
	}
	var charge Charge
	return charge, json.Unmarshal(done.Response.Body, &charge)
}

func Example() {
	// "idemd:50051" or "http://idemd:50051"
	client, err := idemd.New(os.Getenv("IDEMD_ADDR"), "payments")
	if err != nil {
		log.Fatal(err) // an invalid address or namespace
	}
	defer client.Close()

	ctx := context.Background()
	for range 2 { // a retry gets the same charge
		charge, err := ChargeOrder(ctx, client, Order{ID: "order-42", Amount: "1000", Currency: "EUR"})
		fmt.Println(charge.ID, err)
	}
	_, err = ChargeOrder(ctx, client, Order{ID: "order-43", Amount: "666", Currency: "EUR"})
	var declined *DeclinedError
	switch {
	case errors.As(err, &declined): // ErrFinal: the stored decline, as its own type
		fmt.Println("declined:", declined.Code)
	case errors.Is(err, idemd.ErrInProgress), errors.Is(err, idemd.ErrRetryable):
		// nothing happened: answer 503 with Retry-After
	case errors.Is(err, idemd.ErrOutcomeUnknown):
		// it may have charged: a retry is safe (same downstream key)
	case errors.Is(err, idemd.ErrFingerprintMismatch):
		// the key was used for another request: answer 422
	}
	// Output:
	// ch_1 <nil>
	// ch_1 <nil>
	// declined: insufficient_funds
}

// README: end

func Example_reconcile() {
	client, err := idemd.New(os.Getenv("IDEMD_ADDR"), "payments")
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	ctx := context.Background()
	// A new order on every run of the example (go test -count).
	key := idemd.EntityKey(fmt.Sprintf("order-%d", time.Now().UnixNano()), "charge")
	fp := idemd.Fingerprint(map[string]string{"amount": "1000", "currency": "EUR"})
	charge := func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
		if attempt.Number > 1 {
			log.Fatal("ran again although the provider holds the charge")
		}
		// Charged, but the answer was lost.
		_, _ = provider.Charge(ctx, "1000", "EUR", attempt.DownstreamKey)
		return idemd.Response{}, idemd.OutcomeUnknown(ErrProviderTimeout)
	}
	_, err = client.RunOnce(ctx, key, fp, charge)
	fmt.Println(errors.Is(err, idemd.ErrOutcomeUnknown))

	// README: begin
	done, err := client.RunOnce(ctx, key, fp, charge, idemd.WithReconcile(
		func(ctx context.Context, attempt idemd.Attempt) (*idemd.Response, error) {
			found, err := provider.FindByMetadata(ctx, "idempotency_key", attempt.DownstreamKey)
			if err != nil || found == nil {
				return nil, err // nil, nil: not charged, the operation runs
			}
			return &idemd.Response{Body: found.JSON(), Code: 201, ContentType: "application/json"}, nil
		}))
	// README: end
	fmt.Println(done.Reconciled, done.Attempt, err)
	// Output:
	// true
	// true 2 <nil>
}

// TestReadmeExamplesAreTheseExamples fails when a Go block of README.md and
// the code between a pair of README markers here drift apart. The README
// shows Example as main, without its Output.
func TestReadmeExamplesAreTheseExamples(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	source, err := os.ReadFile("example_test.go")
	if err != nil {
		t.Fatal(err)
	}
	var examples []string
	for _, region := range regexp.MustCompile(`(?s)// README: begin\n(.*?)\t*// README: end\n`).FindAllStringSubmatch(string(source), -1) {
		example := strings.Replace(region[1], "func Example() {\n", "func main() {\n", 1)
		example = regexp.MustCompile(`\t// Output:\n(\t//.*\n)*`).ReplaceAllString(example, "")
		if strings.HasPrefix(example, "\t") {
			example = regexp.MustCompile(`(?m)^\t`).ReplaceAllString(example, "")
		}
		examples = append(examples, strings.TrimSpace(example))
	}
	blocks := regexp.MustCompile("(?s)```go\n(.*?)\n```").FindAllStringSubmatch(string(readme), -1)
	if len(examples) == 0 || len(blocks) != len(examples) {
		t.Fatalf("%d Go blocks in README.md, %d marked examples in example_test.go", len(blocks), len(examples))
	}
	for i, block := range blocks {
		if block[1] != examples[i] {
			t.Errorf("README.md's Go block %d differs from example_test.go's marked example %d: copy it over", i+1, i+1)
		}
	}
}
