// Package budgets fills each storage budget on purpose, with small limits,
// through the public API with every service running: the noisy tenant is
// refused with a clear, retryable error naming the budget, the quiet
// tenant is served as if nothing happened, and every accepted impression is
// delivered or parked, by key.
package budgets

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/bulkhead-io/bulkhead/e2e/internal/stack"
	"github.com/bulkhead-io/bulkhead/pkg/admission"
	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/leaktest"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
	"github.com/bulkhead-io/bulkhead/pkg/testkit"
)

func TestMain(m *testing.M) { leaktest.VerifyTestMain(m) }

type env struct {
	t   *testing.T
	ing ingestv1.IngestServiceClient
	adm adminv1.AdminServiceClient
}

func start(t *testing.T, tune func(*stack.Configs)) *env {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end")
	}
	_, ing, adm := stack.StartT(t, stack.Options{StoreDir: t.TempDir(), Tune: func(c *stack.Configs) {
		c.Monitor.Engine.BacklogInterval = 200 * time.Millisecond
		tune(c)
	}, Log: stack.TestLogger(t)})
	return &env{t: t, ing: ing, adm: adm}
}

func operator() context.Context { return stack.WithToken(context.Background(), stack.AdminToken) }

// destination creates d for r and returns r.
func (e *env) destination(d *adminv1.Destination, r *stack.Receiver) *stack.Receiver {
	e.t.Helper()
	e.t.Cleanup(r.Close)
	d.Url, d.Enabled, d.Linger = r.URL(), true, durationpb.New(20*time.Millisecond)
	resp, err := e.adm.CreateDestination(operator(), &adminv1.CreateDestinationRequest{Destination: d})
	if err != nil {
		e.t.Fatalf("create %s: %v", d.GetId(), err)
	}
	if err := r.SetSecret(resp.GetDestination().GetSecret()); err != nil {
		e.t.Fatal(err)
	}
	return r
}

// submit sends one batch of n impressions keyed "<tenant>-<seq>-<i>" and
// returns the keys accepted (none when refused) and the error.
func (e *env) submit(tenant string, seq, n int) ([]string, error) {
	req := &ingestv1.SubmitRequest{IdempotencyKey: fmt.Sprintf("%s-%d", tenant, seq)}
	var keys []string
	for i := range n {
		k := fmt.Sprintf("%s-%d-%d", tenant, seq, i)
		keys = append(keys, k)
		req.Impressions = append(req.Impressions, testkit.Impressions(k, 1, func(_ int, imp *ingestv1.Impression) { imp.Key = k })...)
	}
	if _, err := e.ing.Submit(stack.WithToken(context.Background(), "key-"+tenant), req); err != nil {
		return nil, err
	}
	return keys, nil
}

// quiet submits small batches for tenant every 50 ms until stop closes,
// failing the test on any refusal, and returns the keys accepted.
func (e *env) quiet(tenant string, stop <-chan struct{}) func() []string {
	var mu sync.Mutex
	var keys []string
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for seq := 0; ; seq++ {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			k, err := e.submit(tenant, seq, 5)
			if err != nil {
				e.t.Errorf("quiet tenant %s refused: %v", tenant, err)
				return
			}
			mu.Lock()
			keys = append(keys, k...)
			mu.Unlock()
		}
	}()
	return func() []string {
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		return keys
	}
}

// refusal checks err is a retryable ResourceExhausted with reason.
func refusal(t *testing.T, err error, reason string) *errdetails.ErrorInfo {
	t.Helper()
	st, _ := status.FromError(err)
	if st.Code() != codes.ResourceExhausted {
		t.Fatalf("refused with %v, want ResourceExhausted", err)
	}
	var info *errdetails.ErrorInfo
	retry := false
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.ErrorInfo:
			info = d
		case *errdetails.RetryInfo:
			retry = d.GetRetryDelay().AsDuration() > 0
		}
	}
	if info.GetReason() != reason || info.GetDomain() != admission.Domain || !retry {
		t.Fatalf("refused with %v (details %v), want reason %s and a RetryInfo", err, st.Details(), reason)
	}
	return info
}

// parked returns the keys parked for dest and their reasons.
func (e *env) parked(dest string) (map[string]bool, map[string]int) {
	e.t.Helper()
	s, err := e.adm.ExportParked(stack.WithToken(context.Background(), stack.ViewerToken), &adminv1.ExportParkedRequest{Id: dest})
	if err != nil {
		e.t.Fatal(err)
	}
	keys, reasons := map[string]bool{}, map[string]int{}
	for {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return keys, reasons
		}
		if err != nil {
			e.t.Fatalf("export %s: %v", dest, err)
		}
		reasons[m.GetParkReason()]++
		for _, imp := range m.GetImpressions() {
			keys[imp.GetKey()] = true
		}
	}
}

// accounted checks accepted = delivered ∪ parked, by key: every accepted key
// reached r or is parked for dest, and nothing else did.
func accounted(r *stack.Receiver, parkedKeys map[string]bool, accepted []string) error {
	got := r.Snapshot().Keys
	for _, k := range accepted {
		if got[k] == 0 && !parkedKeys[k] {
			return fmt.Errorf("accepted %s is neither delivered nor parked (%d delivered, %d parked of %d accepted)",
				k, len(got), len(parkedKeys), len(accepted))
		}
	}
	want := map[string]bool{}
	for _, k := range accepted {
		want[k] = true
	}
	for k := range got {
		if !want[k] {
			return fmt.Errorf("delivered %s, which was never accepted", k)
		}
	}
	return nil
}

func budgetOf(h *adminv1.DestinationHealth, resource string) string {
	for _, b := range h.GetBudgets() {
		if b.GetResource() == resource {
			return fmt.Sprintf("%d/%d exhausted=%v", b.GetUsed(), b.GetLimit(), b.GetExhausted())
		}
	}
	return "none"
}

// TestPausedDestinationSpendsOnlyItsTenantsParkedBudget: t1 pauses its
// destination and keeps submitting, as in the incident review's third
// shape. Its parked budget (40 batches here) is spent, and from then on t1
// alone is refused with PARKED_BUDGET_EXHAUSTED; t2 is accepted and
// delivered throughout. Resuming replays t1's parked data, which frees the
// budget, and t1 is accepted again.
func TestPausedDestinationSpendsOnlyItsTenantsParkedBudget(t *testing.T) {
	e := start(t, func(c *stack.Configs) { c.Monitor.Engine.Budgets.TenantParked = 40 })
	paused := e.destination(&adminv1.Destination{Id: "noisy", TenantId: "t1"}, stack.NewReceiver())
	quietR := e.destination(&adminv1.Destination{Id: "quiet", TenantId: "t2"}, stack.NewReceiver())
	if _, err := e.adm.PauseDestination(operator(), &adminv1.PauseDestinationRequest{Id: "noisy", Reason: "maintenance"}); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	quietKeys := e.quiet("t2", stop)

	var accepted []string
	var last error
	deadline := time.Now().Add(60 * time.Second)
	for seq := 0; time.Now().Before(deadline); seq++ {
		keys, err := e.submit("t1", seq, 10)
		if err != nil {
			last = err
			break
		}
		accepted = append(accepted, keys...)
		time.Sleep(20 * time.Millisecond)
	}
	if last == nil {
		t.Fatalf("t1 accepted %d impressions into a paused destination without being refused", len(accepted))
	}
	info := refusal(t, last, admission.ReasonParkedBudget)
	t.Logf("t1 refused after %d accepted impressions: %v", len(accepted), info.GetMetadata())

	// The destination's health says which budget is spent, and why t1 is refused.
	h, err := e.adm.GetDestinationHealth(operator(), &adminv1.GetDestinationHealthRequest{Id: "noisy"})
	if err != nil {
		t.Fatal(err)
	}
	if h.GetHealth().GetTenantRefusal().GetReason() != admission.ReasonParkedBudget {
		t.Errorf("health of noisy shows refusal %v", h.GetHealth().GetTenantRefusal())
	}
	t.Logf("noisy budgets: tenant_parked %s", budgetOf(h.GetHealth(), "tenant_parked"))

	// Nothing accepted is lost: all of t1's is parked, with the pause as reason.
	poll.CheckFor(t, 30*time.Second, 200*time.Millisecond, func() error {
		keys, _ := e.parked("noisy")
		return accounted(paused, keys, accepted)
	})
	if n := paused.Snapshot().Requests; n != 0 {
		t.Errorf("the paused destination got %d requests", n)
	}

	// The quiet tenant went on as usual, and got everything.
	time.Sleep(500 * time.Millisecond)
	close(stop)
	qk := quietKeys()
	poll.CheckFor(t, 30*time.Second, 100*time.Millisecond, func() error {
		return accounted(quietR, nil, qk)
	})

	// Resume: the parked data replays, the budget frees, t1 is accepted again.
	if _, err := e.adm.ResumeDestination(operator(), &adminv1.ResumeDestinationRequest{Id: "noisy", Reason: "done"}); err != nil {
		t.Fatal(err)
	}
	poll.CheckFor(t, 60*time.Second, 200*time.Millisecond, func() error {
		keys, err := e.submit("t1", 100000, 1)
		if err != nil {
			return err
		}
		accepted = append(accepted, keys...)
		return nil
	})
	poll.CheckFor(t, 60*time.Second, 200*time.Millisecond, func() error {
		return accounted(paused, nil, accepted)
	})
}

// TestSlowDestinationParksBeyondItsDeliveryBudget: a destination that
// answers 200 slowly (never quarantined) may hold only its budget of
// batches in DELIVERY (20 here); its further batches are parked with the
// reason "delivery backlog over budget", not queued without bound, and
// its tenant's other destination and another tenant are delivered as usual.
// When it has caught up, the router replays what it parked.
func TestSlowDestinationParksBeyondItsDeliveryBudget(t *testing.T) {
	e := start(t, func(c *stack.Configs) { c.Monitor.Streams.DestinationBacklog = 20 })
	slowR := stack.NewReceiver()
	slowR.Delay.Store(int64(time.Second))
	slow := e.destination(&adminv1.Destination{Id: "slow", TenantId: "t1"}, slowR)
	sibling := e.destination(&adminv1.Destination{Id: "sibling", TenantId: "t1"}, stack.NewReceiver())
	quietR := e.destination(&adminv1.Destination{Id: "quiet", TenantId: "t2"}, stack.NewReceiver())
	stop := make(chan struct{})
	quietKeys := e.quiet("t2", stop)

	var accepted []string
	for seq := range 80 {
		keys, err := e.submit("t1", seq, 10)
		if err != nil {
			t.Fatalf("t1 refused: %v", err)
		}
		accepted = append(accepted, keys...)
		time.Sleep(20 * time.Millisecond) // ~50 batches/s: the slow one takes a few
	}
	// Parked over budget at some point; and once the slow destination has
	// caught up, what was parked over budget is replayed, so in the end it
	// has every accepted impression and nothing is parked.
	sawOverBudget := 0
	poll.CheckFor(t, 120*time.Second, 100*time.Millisecond, func() error {
		keys, reasons := e.parked("slow")
		sawOverBudget = max(sawOverBudget, reasons[parked.OverBudget.String()])
		if sawOverBudget == 0 {
			return fmt.Errorf("nothing parked over budget yet (%v)", reasons)
		}
		if len(keys) != 0 {
			return fmt.Errorf("%d impressions still parked", len(keys))
		}
		return accounted(slow, nil, accepted)
	})
	t.Logf("slow: up to %d batches parked over budget at once, all delivered in the end", sawOverBudget)
	poll.CheckFor(t, 30*time.Second, 100*time.Millisecond, func() error { return accounted(sibling, nil, accepted) })
	if keys, _ := e.parked("sibling"); len(keys) != 0 {
		t.Errorf("sibling, which keeps up, had %d impressions parked", len(keys))
	}
	close(stop)
	qk := quietKeys()
	poll.CheckFor(t, 30*time.Second, 100*time.Millisecond, func() error { return accounted(quietR, nil, qk) })

}
