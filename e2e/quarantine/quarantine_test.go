// Package quarantine tests the heart of Bulkhead end to end: failing
// destinations are quarantined within seconds while healthy ones keep
// receiving promptly, parked traffic is replayed on recovery, nothing is lost,
// a monitor failover keeps decisions coming, and operators can pause, resume,
// export and replay through the AdminService.
package quarantine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/bulkhead-io/bulkhead/e2e/internal/fleet"
	"github.com/bulkhead-io/bulkhead/e2e/internal/stack"
	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/leaktest"
	"github.com/bulkhead-io/bulkhead/pkg/natstest"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

func TestMain(m *testing.M) { leaktest.VerifyTestMain(m) }

// ledger records every accepted impression's submit time and every arrival.
type ledger struct {
	mu        sync.Mutex
	submitted map[string]time.Time // key → submit time
	arrived   map[string]time.Time // key → first arrival
	dups      int
}

func newLedger() *ledger {
	return &ledger{submitted: map[string]time.Time{}, arrived: map[string]time.Time{}}
}

func (l *ledger) accepted(keys []string, at time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, k := range keys {
		l.submitted[k] = at
	}
}

func (l *ledger) arrival(a fleet.Arrival) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, k := range a.Keys {
		if _, ok := l.arrived[k]; ok {
			l.dups++
			continue
		}
		l.arrived[k] = a.At
	}
}

// missing returns accepted keys that have not arrived.
func (l *ledger) missing() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for k := range l.submitted {
		if _, ok := l.arrived[k]; !ok {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}

// arrivedSince counts the keys of dests that arrived at or after t0.
func (l *ledger) arrivedSince(dests map[string]bool, t0 time.Time) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for k, at := range l.arrived {
		if !at.Before(t0) && dests[destOf(k)] {
			n++
		}
	}
	return n
}

// latencies returns submit→arrival of the keys of dests submitted in [from, to).
func (l *ledger) latencies(dests map[string]bool, from, to time.Time) []time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []time.Duration
	for k, sub := range l.submitted {
		if sub.Before(from) || !sub.Before(to) || !dests[destOf(k)] {
			continue
		}
		if at, ok := l.arrived[k]; ok {
			out = append(out, at.Sub(sub))
		} else {
			out = append(out, time.Hour) // not arrived counts as very late
		}
	}
	slices.Sort(out)
	return out
}

func destOf(key string) string {
	for i := range key {
		if key[i] == '/' {
			return key[:i]
		}
	}
	return key
}

func pct(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, int(q*float64(len(sorted))))]
}

// decisions records every decision stored in the KV bucket, with when it was seen.
type decisions struct {
	mu  sync.Mutex
	all []seen
}

type seen struct {
	at time.Time
	d  *eventv1.Decision
}

func watchDecisions(t *testing.T, js jetstream.JetStream) *decisions {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	kv, err := js.KeyValue(ctx, topology.BucketQuarantine)
	if err != nil {
		t.Fatal(err)
	}
	w, err := kv.WatchAll(ctx, jetstream.UpdatesOnly())
	if err != nil {
		t.Fatal(err)
	}
	ds := &decisions{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for e := range w.Updates() {
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue
			}
			var d eventv1.Decision
			if registry.Decode(e.Value(), &d) == nil {
				ds.mu.Lock()
				ds.all = append(ds.all, seen{at: time.Now(), d: &d})
				ds.mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() {
		_ = w.Stop()
		cancel()
		<-done
	})
	return ds
}

// first returns when dest was first seen in state, or false.
func (ds *decisions) first(dest string, state eventv1.State) (time.Time, bool) {
	ds.mu.Lock()
	defer ds.mu.Unlock()
	for _, s := range ds.all {
		if s.d.GetDestinationId() == dest && s.d.GetState() == state {
			return s.at, true
		}
	}
	return time.Time{}, false
}

func (ds *decisions) after(t0 time.Time) int {
	ds.mu.Lock()
	defer ds.mu.Unlock()
	n := 0
	for _, s := range ds.all {
		if s.at.After(t0) {
			n++
		}
	}
	return n
}

// firstFailures records when each destination's first failed attempt was reported.
func firstFailures(t *testing.T, nc *nats.Conn) func(dest string) (time.Time, bool) {
	var mu sync.Mutex
	first := map[string]time.Time{}
	sub, err := nc.Subscribe(topology.AllOutcomes, func(m *nats.Msg) {
		var o eventv1.Outcome
		if proto.Unmarshal(m.Data, &o) != nil || o.GetErrorClass() == eventv1.ErrorClass_ERROR_CLASS_UNSPECIFIED || o.GetProbe() {
			return
		}
		mu.Lock()
		if _, ok := first[o.GetDestinationId()]; !ok {
			first[o.GetDestinationId()] = o.GetAt().AsTime()
		}
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return func(dest string) (time.Time, bool) {
		mu.Lock()
		defer mu.Unlock()
		at, ok := first[dest]
		return at, ok
	}
}

// load submits a batch of perTick impressions for every destination each tick
// until stop is closed; keys are "<dest>/<n>".
func load(t *testing.T, s *stack.Stack, dests []string, perTick int, tick time.Duration, l *ledger, stop <-chan struct{}) *sync.WaitGroup {
	ing, err := s.IngestClient()
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for _, d := range dests {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx := stack.WithToken(context.Background(), "key-"+d)
			tk := time.NewTicker(tick)
			defer tk.Stop()
			for n := 0; ; {
				select {
				case <-stop:
					return
				case <-tk.C:
				}
				req := &ingestv1.SubmitRequest{}
				var keys []string
				for range perTick {
					key := fmt.Sprintf("%s/%d", d, n)
					n++
					keys = append(keys, key)
					req.Impressions = append(req.Impressions, &ingestv1.Impression{Key: key, Split: "s", Treatment: "on", Time: time.Now().UnixMilli()})
				}
				at := time.Now()
				cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				_, err := ing.Submit(cctx, req)
				cancel()
				if err == nil {
					l.accepted(keys, at)
				} else {
					t.Errorf("submit %s: %v", d, err)
				}
			}
		}()
	}
	return &wg
}

func apiKeys(dests []string) []string {
	out := make([]string, len(dests))
	for i, d := range dests {
		out[i] = "key-" + d + "=" + d
	}
	return out
}

// TestFailingDestinationsAreQuarantinedHealthyOnesUnaffected runs 20
// destinations, 5 of which fail in different ways for a while, with two
// monitors of which the active one is stopped mid-outage.
func TestFailingDestinationsAreQuarantinedHealthyOnesUnaffected(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	dests := make([]string, 20)
	for i := range dests {
		dests[i] = fmt.Sprintf("d%02d", i)
	}
	const (
		hang, refused, unavailable, flapping, slow = 0, 1, 2, 3, 4
	)
	s, err := stack.Start(stack.Options{StoreDir: t.TempDir(), APIKeys: apiKeys(dests), Monitors: 2, Log: stack.TestLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	l := newLedger()
	fl, err := fleet.New(len(dests), fleet.Options{SlowDelay: 1500 * time.Millisecond, FlapPeriod: time.Second, OnArrival: l.arrival})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fl.Close() })
	nc, js := natstest.Connect(t, s.NATS)
	ds := watchDecisions(t, js)
	failedAt := firstFailures(t, nc)

	adm, err := s.AdminClient(1)
	if err != nil {
		t.Fatal(err)
	}
	ctx := stack.WithToken(context.Background(), stack.AdminToken)
	for i, d := range dests {
		timeout := 2 * time.Second
		if i == slow {
			timeout = 5 * time.Second
		}
		_, err := adm.CreateDestination(ctx, &adminv1.CreateDestinationRequest{Destination: &adminv1.Destination{
			Id: d, TenantId: d, Url: fl.URL(i), Enabled: true,
			Linger: durationpb.New(50 * time.Millisecond), Timeout: durationpb.New(timeout),
		}})
		if err != nil {
			t.Fatal(err)
		}
	}

	stop := make(chan struct{})
	submitters := load(t, s, dests, 5, 100*time.Millisecond, l, stop)
	stopped := false
	stopLoad := func() {
		if !stopped {
			stopped = true
			close(stop)
			submitters.Wait()
		}
	}
	t.Cleanup(stopLoad)

	// Steady phase: enough healthy traffic delivered to compare with.
	healthy := map[string]bool{}
	for _, d := range dests[5:] {
		healthy[d] = true
	}
	steady := time.Now()
	poll.CheckFor(t, 60*time.Second, 100*time.Millisecond, func() error {
		if n := l.arrivedSince(healthy, steady); n < 2000 {
			return fmt.Errorf("steady phase: %d healthy impressions delivered, want 2000", n)
		}
		return nil
	})
	onset := time.Now()
	for i, b := range map[int]fleet.Behavior{hang: fleet.Hang, refused: fleet.Refused, unavailable: fleet.Status503, flapping: fleet.Flapping, slow: fleet.SlowOK} {
		if err := fl.Set(i, b); err != nil {
			t.Fatal(err)
		}
	}

	// The hanging and the refusing destinations are quarantined.
	for _, i := range []int{hang, refused, unavailable} {
		poll.CheckFor(t, 60*time.Second, 100*time.Millisecond, func() error {
			if _, ok := ds.first(dests[i], eventv1.State_STATE_QUARANTINED); !ok {
				return fmt.Errorf("%s (%v) not quarantined", dests[i], fl.Behavior(i))
			}
			return nil
		})
	}
	for _, i := range []int{hang, refused} {
		q, _ := ds.first(dests[i], eventv1.State_STATE_QUARANTINED)
		f, ok := failedAt(dests[i])
		if !ok {
			t.Fatalf("%s quarantined without a reported failure", dests[i])
		}
		t.Logf("%s (%v): first failure %.1fs after onset, quarantined %.1fs after it",
			dests[i], fl.Behavior(i), f.Sub(onset).Seconds(), q.Sub(f).Seconds())
		if q.Sub(f) > 10*time.Second {
			t.Errorf("%s quarantined %v after its first failure; want within 10s", dests[i], q.Sub(f))
		}
	}

	// Fail over: stop the monitor holding the lease; the other takes over.
	leases, err := js.KeyValue(context.Background(), topology.BucketLeases)
	if err != nil {
		t.Fatal(err)
	}
	e, err := leases.Get(context.Background(), "monitor")
	if err != nil {
		t.Fatal(err)
	}
	active := string(e.Value())
	if err := s.StopService(active); err != nil {
		t.Fatalf("stop %s: %v", active, err)
	}
	failover := time.Now()
	poll.CheckFor(t, 20*time.Second, 100*time.Millisecond, func() error {
		e, err := leases.Get(context.Background(), "monitor")
		if err != nil {
			return err
		}
		if string(e.Value()) == active {
			return fmt.Errorf("lease still held by %s", active)
		}
		return nil
	})
	t.Logf("%s stopped; lease taken over in %v", active, time.Since(failover).Round(100*time.Millisecond))

	// The outage continues under the new monitor until it has decided
	// something itself (probes of the quarantined destinations).
	poll.CheckFor(t, 60*time.Second, 100*time.Millisecond, func() error {
		if n := ds.after(failover); n < 3 {
			return fmt.Errorf("%d decisions since the failover, want 3", n)
		}
		return nil
	})
	heal := time.Now()
	for _, i := range []int{hang, refused, unavailable, flapping, slow} {
		if err := fl.Set(i, fleet.Healthy); err != nil {
			t.Fatal(err)
		}
	}
	// Load goes on until the healed destinations receive again.
	healed := map[string]bool{}
	for _, i := range []int{hang, refused, unavailable, flapping, slow} {
		healed[dests[i]] = true
	}
	poll.CheckFor(t, 60*time.Second, 100*time.Millisecond, func() error {
		if n := l.arrivedSince(healed, heal); n < 100 {
			return fmt.Errorf("%d impressions reached the healed destinations since healing, want 100", n)
		}
		return nil
	})
	stopLoad()

	// Everything accepted is delivered once the failures heal: parked traffic
	// is replayed (accepted = delivered ∪ parked, with parked drained).
	poll.CheckFor(t, 150*time.Second, 500*time.Millisecond, func() error {
		if m := l.missing(); len(m) > 0 {
			return fmt.Errorf("%d impressions not delivered yet, e.g. %s", len(m), m[0])
		}
		return nil
	})
	t.Logf("all %d impressions delivered %.1fs after healing; %d duplicates", len(l.submitted), time.Since(heal).Seconds(), l.dups)
	for _, d := range dests {
		n, _, err := parked.Stats(context.Background(), js, d)
		if err != nil {
			t.Fatal(err)
		}
		if n != 0 {
			t.Errorf("%s: %d batches left in PARKED after the drain", d, n)
		}
	}

	// Healthy destinations kept receiving promptly throughout the outage.
	before := l.latencies(healthy, steady, onset)
	during := l.latencies(healthy, onset, heal)
	t.Logf("healthy destinations: p50 %v → %v, p99 %v → %v (before → during the outage, %d samples)",
		pct(before, .5), pct(during, .5), pct(before, .99), pct(during, .99), len(during))
	if p := pct(during, .99); p > 3*time.Second {
		t.Errorf("healthy p99 during the outage is %v; want well under the failing destinations' 2s timeout", p)
	}

	// The slow-but-successful destination is never quarantined.
	if _, ok := ds.first(dests[slow], eventv1.State_STATE_QUARANTINED); ok {
		t.Errorf("slow but successful %s was quarantined", dests[slow])
	}
	// Decisions continued after the failover (recoveries at least).
	if n := ds.after(failover); n == 0 {
		t.Error("no decision after the active monitor stopped")
	}
	for _, i := range []int{hang, refused, unavailable} {
		poll.CheckFor(t, 60*time.Second, 200*time.Millisecond, func() error {
			if _, ok := ds.first(dests[i], eventv1.State_STATE_HEALTHY); !ok {
				return fmt.Errorf("%s not HEALTHY again: %s", dests[i], ds.history(dests[i]))
			}
			return nil
		})
	}
}

// history describes a destination's decisions, for failure messages.
func (ds *decisions) history(dest string) string {
	ds.mu.Lock()
	defer ds.mu.Unlock()
	out := ""
	for _, s := range ds.all {
		if s.d.GetDestinationId() == dest {
			out += fmt.Sprintf("[%s %s by %s: %s] ", s.at.Format("15:04:05.0"), s.d.GetState(), s.d.GetDecidedBy(), s.d.GetReason())
		}
	}
	return out
}

// TestOperatorPauseExportReplay drives the operators' actions through gRPC.
func TestOperatorPauseExportReplay(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	s, err := stack.Start(stack.Options{StoreDir: t.TempDir(), APIKeys: []string{"key-t1=t1"}, Log: stack.TestLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	l := newLedger()
	fl, err := fleet.New(2, fleet.Options{OnArrival: l.arrival})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fl.Close() })
	adm, err := s.AdminClient(0)
	if err != nil {
		t.Fatal(err)
	}
	ing, err := s.IngestClient()
	if err != nil {
		t.Fatal(err)
	}
	op := stack.WithToken(context.Background(), stack.AdminToken)
	viewer := stack.WithToken(context.Background(), stack.ViewerToken)
	for i, id := range []string{"p1", "p2"} {
		if _, err := adm.CreateDestination(op, &adminv1.CreateDestinationRequest{Destination: &adminv1.Destination{
			Id: id, TenantId: "t1", Url: fl.URL(i), Enabled: true, Linger: durationpb.New(20 * time.Millisecond)}}); err != nil {
			t.Fatal(err)
		}
	}
	submit := func(prefix string, n int) {
		t.Helper()
		req := &ingestv1.SubmitRequest{}
		var keys []string
		for i := range n {
			k := fmt.Sprintf("%s-%d", prefix, i)
			keys = append(keys, k)
			req.Impressions = append(req.Impressions, &ingestv1.Impression{Key: k, Split: "s", Treatment: "on", Time: 1})
		}
		if _, err := ing.Submit(stack.WithToken(context.Background(), "key-t1"), req); err != nil {
			t.Fatal(err)
		}
		l.accepted(keys, time.Now())
	}

	// Authorisation: the viewer reads but cannot act; no token, no answer.
	if _, err := adm.PauseDestination(viewer, &adminv1.PauseDestinationRequest{Id: "p1", Reason: "x"}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("viewer pause: %v, want PermissionDenied", err)
	}
	if _, err := adm.PauseDestination(context.Background(), &adminv1.PauseDestinationRequest{Id: "p1", Reason: "x"}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("anonymous pause: %v, want Unauthenticated", err)
	}
	if _, err := adm.PauseDestination(op, &adminv1.PauseDestinationRequest{Id: "nope", Reason: "x"}); status.Code(err) != codes.NotFound {
		t.Errorf("pause unknown: %v, want NotFound", err)
	}
	if _, err := adm.PurgeParked(viewer, &adminv1.PurgeParkedRequest{Id: "p1", Reason: "x"}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("viewer purge: %v, want PermissionDenied", err)
	}

	// Dry run of a tenant pause lists both and changes nothing.
	dry, err := adm.PauseTenant(op, &adminv1.PauseTenantRequest{TenantId: "t1", Reason: "maintenance", DryRun: true})
	if err != nil || len(dry.GetDestinationIds()) != 2 {
		t.Fatalf("dry run: %v %v", dry, err)
	}
	h, err := adm.GetDestinationHealth(viewer, &adminv1.GetDestinationHealthRequest{Id: "p1"})
	if err != nil || h.GetHealth().GetDecision().GetState() != eventv1.State_STATE_HEALTHY {
		t.Fatalf("after dry run: %v %v", h, err)
	}

	// Pause p1: its traffic is parked while p2 keeps receiving.
	p, err := adm.PauseDestination(op, &adminv1.PauseDestinationRequest{Id: "p1", Reason: "customer maintenance"})
	if err != nil || p.GetDecision().GetState() != eventv1.State_STATE_PAUSED {
		t.Fatalf("pause: %v %v", p, err)
	}
	// Routers apply a decision from their KV watch within milliseconds, and
	// nothing outside a router shows that moment (a marker batch would be
	// counted below), so this one wait is a bound, not a poll.
	time.Sleep(1500 * time.Millisecond)
	submit("a", 50)
	poll.CheckFor(t, 30*time.Second, 100*time.Millisecond, func() error {
		h, err := adm.GetDestinationHealth(viewer, &adminv1.GetDestinationHealthRequest{Id: "p1"})
		if err != nil {
			return err
		}
		if h.GetHealth().GetParked() == 0 {
			return errors.New("nothing parked for the paused destination yet")
		}
		return nil
	})
	if got := fl.Stats(0).Impressions; got != 0 {
		t.Errorf("paused destination received %d impressions", got)
	}
	poll.CheckFor(t, 30*time.Second, 100*time.Millisecond, func() error {
		if got := fl.Stats(1).Impressions; got < 50 {
			return fmt.Errorf("p2 received %d of 50", got)
		}
		return nil
	})

	// Export shows the parked impressions with the reason.
	stream, err := adm.ExportParked(viewer, &adminv1.ExportParkedRequest{Id: "p1"})
	if err != nil {
		t.Fatal(err)
	}
	exported := 0
	for {
		m, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if m.GetParkReason() != "paused" {
			t.Errorf("park reason %q, want paused", m.GetParkReason())
		}
		exported += len(m.GetImpressions())
	}
	if exported != 50 {
		t.Errorf("exported %d impressions, want 50", exported)
	}
	// Replaying a paused destination is refused: it would only park again.
	if _, err := adm.ReplayParked(op, &adminv1.ReplayParkedRequest{Id: "p1"}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("replay while paused: %v, want FailedPrecondition", err)
	}

	// Nothing lifts a pause but an operator: still paused after a while (an
	// absence, so it takes a wait).
	time.Sleep(3 * time.Second)
	if h, err := adm.GetDestinationHealth(viewer, &adminv1.GetDestinationHealthRequest{Id: "p1"}); err != nil || h.GetHealth().GetDecision().GetState() != eventv1.State_STATE_PAUSED {
		t.Fatalf("pause lifted on its own: %v %v", h, err)
	}

	// Resume: the parked backlog replays and p1 gets everything.
	r, err := adm.ResumeDestination(op, &adminv1.ResumeDestinationRequest{Id: "p1", Reason: "maintenance over"})
	if err != nil || r.GetDecision().GetState() != eventv1.State_STATE_RECOVERING {
		t.Fatalf("resume: %v %v", r, err)
	}
	poll.CheckFor(t, 60*time.Second, 200*time.Millisecond, func() error {
		if got := fl.Stats(0).Impressions; got < 50 {
			return fmt.Errorf("p1 received %d of 50 after resume", got)
		}
		h, err := adm.GetDestinationHealth(viewer, &adminv1.GetDestinationHealthRequest{Id: "p1"})
		if err != nil {
			return err
		}
		if st := h.GetHealth().GetDecision().GetState(); st != eventv1.State_STATE_HEALTHY || h.GetHealth().GetParked() != 0 {
			return fmt.Errorf("p1 %v with %d parked", st, h.GetHealth().GetParked())
		}
		return nil
	})

	// An explicit replay of a time range: park by pausing again, resume
	// without waiting for the automatic replay, and replay by hand.
	if _, err := adm.PauseDestination(op, &adminv1.PauseDestinationRequest{Id: "p2", Reason: "again"}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond) // as above: routers apply the pause
	submit("b", 30)
	poll.CheckFor(t, 30*time.Second, 100*time.Millisecond, func() error {
		h, err := adm.GetDestinationHealth(viewer, &adminv1.GetDestinationHealthRequest{Id: "p2"})
		if err != nil {
			return err
		}
		if h.GetHealth().GetParked() == 0 {
			return errors.New("nothing parked for p2 yet")
		}
		return nil
	})
	purge, err := adm.PurgeParked(op, &adminv1.PurgeParkedRequest{Id: "p2", Reason: "count", DryRun: true})
	if err != nil || purge.GetBatches() == 0 {
		t.Fatalf("purge dry run: %v %v", purge, err)
	}
	if _, err := adm.ResumeDestination(op, &adminv1.ResumeDestinationRequest{Id: "p2", Reason: "done"}); err != nil {
		t.Fatal(err)
	}
	if _, err := adm.ReplayParked(op, &adminv1.ReplayParkedRequest{Id: "p2", Rate: 100}); err != nil {
		t.Fatalf("replay: %v", err)
	}
	poll.CheckFor(t, 60*time.Second, 200*time.Millisecond, func() error {
		if m := l.missing(); len(m) > 0 {
			return fmt.Errorf("%d not delivered, e.g. %s", len(m), m[0])
		}
		return nil
	})

	// Every operator action is in the audit trail.
	_, js := natstest.Connect(t, s.NATS)
	st, err := js.Stream(context.Background(), topology.StreamAudit)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(context.Background(), jetstream.WithSubjectFilter("imp.audit.admin.t1"))
	if err != nil {
		t.Fatal(err)
	}
	// 2 creates, pause tenant (dry run), pause, resume, pause, purge, resume, replay.
	if n := info.State.Subjects["imp.audit.admin.t1"]; n < 9 {
		t.Errorf("%d admin audit records for t1, want at least 9", n)
	}
}
