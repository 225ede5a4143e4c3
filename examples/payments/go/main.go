// The Go worker of the payment demo (its protocol:
// examples/payments/polyglot.rs). It charges its share of the payments
// through the HTTP provider with RunOnce, and exits between charging and
// completing when the provider says so.
package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	idemd "github.com/idemd/idemd/clients/go"
)

func env(name string) string {
	value, ok := os.LookupEnv(name)
	if !ok {
		fmt.Fprintf(os.Stderr, "%s is not set (the worker runs under examples/payments/run)\n", name)
		os.Exit(2)
	}
	return value
}

var (
	provider = env("PROVIDER_URL")
	worker   = env("WORKER")
	web      = &http.Client{Timeout: 10 * time.Second}
)

func stored(code int32, body []byte) idemd.Response {
	return idemd.Response{Body: body, Code: code, ContentType: "application/json"}
}

// charge is the operation: what the provider's answer means for idemd.
func charge(ctx context.Context, payment int, attempt idemd.Attempt) (idemd.Response, error) {
	body := fmt.Sprintf(`{"payment":"pay-%d","amount":"%d","currency":"EUR"}`, payment, 1000+7*payment)
	request, err := http.NewRequestWithContext(ctx, http.MethodPost, provider+"/v1/charges", strings.NewReader(body))
	if err != nil {
		return idemd.Response{}, idemd.Retryable(err)
	}
	request.Header.Set("Content-Type", "application/json")
	request.Header.Set("Idempotency-Key", attempt.DownstreamKey)
	request.Header.Set("Demo-Worker", worker)
	answer, err := web.Do(request)
	if err != nil {
		// The request may have left: whether it charged is unknown.
		return idemd.Response{}, idemd.OutcomeUnknown(err)
	}
	defer answer.Body.Close()
	text, err := io.ReadAll(answer.Body)
	if err != nil {
		return idemd.Response{}, idemd.OutcomeUnknown(err)
	}
	switch answer.StatusCode {
	case http.StatusCreated:
		if answer.Header.Get("Demo-Crash") == "now" {
			os.Exit(3) // charged, and the process dies before telling idemd
		}
		return stored(201, text), nil
	case http.StatusPaymentRequired:
		return idemd.Response{}, idemd.Final(stored(402, text))
	case http.StatusGatewayTimeout:
		return idemd.Response{}, idemd.OutcomeUnknown(errors.New("the provider's answer was lost"))
	}
	return idemd.Response{}, idemd.Retryable(fmt.Errorf("the provider answered %d", answer.StatusCode))
}

// find is the reconcile hook: what the provider holds for the downstream key.
func find(ctx context.Context, attempt idemd.Attempt) (*idemd.Response, error) {
	request, err := http.NewRequestWithContext(ctx, http.MethodGet,
		provider+"/v1/charges?idempotency_key="+url.QueryEscape(attempt.DownstreamKey), nil)
	if err != nil {
		return nil, err
	}
	answer, err := web.Do(request)
	if err != nil {
		return nil, err
	}
	defer answer.Body.Close()
	text, err := io.ReadAll(answer.Body)
	if err != nil {
		return nil, err
	}
	switch answer.StatusCode {
	case http.StatusOK:
		found := stored(201, text)
		return &found, nil
	case http.StatusPaymentRequired:
		found := stored(402, text)
		return &found, nil
	case http.StatusNotFound:
		return nil, nil
	}
	return nil, fmt.Errorf("the lookup answered %d", answer.StatusCode)
}

func main() {
	var payments []int
	for _, field := range strings.Split(env("PAYMENTS"), ",") {
		if payment, err := strconv.Atoi(field); err == nil {
			payments = append(payments, payment)
		}
	}
	concurrency, err := strconv.Atoi(env("CONCURRENCY"))
	if err != nil || concurrency < 1 {
		concurrency = 8
	}
	client, err := idemd.New(env("IDEMD_ADDR"), env("NAMESPACE"),
		idemd.WithLeaseTTL(time.Second), idemd.WithWait(500*time.Millisecond), idemd.WithInProgressBudget(2*time.Second))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	defer client.Close()
	var options []idemd.RunOption
	if env("RECONCILE") == "on" {
		options = append(options, idemd.WithReconcile(find))
	}
	// The first call opens the connection: done before the race; its
	// failure is no matter.
	_, _ = client.RunOnce(context.Background(), fmt.Sprintf("warm-up-%d", rand.Uint64()), nil,
		func(context.Context, idemd.Attempt) (idemd.Response, error) { return stored(200, nil), nil })
	fmt.Println("ready")
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n')

	var (
		mu     sync.Mutex
		counts = map[string]int{}
		queue  = make(chan int)
		lanes  sync.WaitGroup
	)
	pay := func(payment int) {
		id := fmt.Sprintf("pay-%d", payment)
		key := idemd.EntityKey(id, "charge")
		fp := idemd.Fingerprint(map[string]string{"payment": id, "amount": strconv.Itoa(1000 + 7*payment), "currency": "EUR"})
		for range 60 {
			done, err := client.RunOnce(context.Background(), key, fp, func(ctx context.Context, attempt idemd.Attempt) (idemd.Response, error) {
				return charge(ctx, payment, attempt)
			}, options...)
			if err != nil {
				// Every failure of a call is retried here; idemd says when it ran.
				time.Sleep(time.Duration(20+rand.IntN(180)) * time.Millisecond)
				continue
			}
			how := "completed"
			switch {
			case done.Replayed:
				how = "replayed"
			case done.Reconciled:
				how = "reconciled"
			}
			mu.Lock()
			counts[how]++
			fmt.Printf("result %s %s %d %s\n", id, how, done.Response.Code, done.Response.Body)
			mu.Unlock()
			return
		}
		mu.Lock()
		counts["unfinished"]++
		mu.Unlock()
	}
	for range concurrency {
		lanes.Add(1)
		go func() {
			defer lanes.Done()
			for payment := range queue {
				pay(payment)
			}
		}()
	}
	for _, payment := range payments {
		queue <- payment
	}
	close(queue)
	lanes.Wait()
	fmt.Printf("summary completed=%d replayed=%d reconciled=%d unfinished=%d\n",
		counts["completed"], counts["replayed"], counts["reconciled"], counts["unfinished"])
}
