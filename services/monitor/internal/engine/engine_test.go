package engine

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/bulkhead-io/bulkhead/pkg/admission"
	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/leaktest"
	"github.com/bulkhead-io/bulkhead/pkg/lifecycle"
	"github.com/bulkhead-io/bulkhead/pkg/netguard"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/testkit"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/bulkhead-io/bulkhead/pkg/webhook"
	"github.com/bulkhead-io/bulkhead/services/monitor/internal/health"
)

func TestMain(m *testing.M) { leaktest.VerifyTestMain(m) }

type env struct {
	t       *testing.T
	js      jetstream.JetStream
	kv      jetstream.KeyValue
	engines []*Engine
}

// startEngines runs n engines (monitor replicas) against one JetStream.
func startEngines(t *testing.T, n int) (*env, []context.CancelFunc) {
	t.Helper()
	return startEnginesWith(t, n, func(*Config) {})
}

// startEnginesWith is startEngines with configure applied to each engine's
// configuration.
func startEnginesWith(t *testing.T, n int, configure func(*Config)) (*env, []context.CancelFunc) {
	t.Helper()
	tk := testkit.JetStream(t, stream.Limits{})
	js, kv := tk.JS, tk.Decisions
	policy, _ := netguard.NewPolicy([]string{"127.0.0.0/8"})
	client := webhook.NewClient(policy, webhook.ClientOptions{})
	t.Cleanup(client.CloseIdleConnections)
	p := health.DefaultPolicy()
	p.ProbeInitial, p.ProbeMax = 200*time.Millisecond, time.Second
	var cancels []context.CancelFunc
	var engines []*Engine
	for i := range n {
		ctx, cancel := context.WithCancel(context.Background())
		log := slog.New(slog.DiscardHandler)
		cfg := Config{Policy: p, Holder: fmt.Sprintf("m%d", i)}
		configure(&cfg)
		view, err := registry.Open(ctx, js, log)
		if err != nil {
			t.Fatal(err)
		}
		refusals, err := admission.Open(ctx, js, log)
		if err != nil {
			t.Fatal(err)
		}
		e, err := New(ctx, js, view, refusals, client, cfg, log, prometheus.NewRegistry())
		if err != nil {
			t.Fatal(err)
		}
		engines = append(engines, e)
		h := lifecycle.Start(ctx, e.Run)
		var once sync.Once
		stop := func() {
			once.Do(func() {
				_ = h.Stop()
				cancel()
				view.Stop()
				refusals.Stop()
			})
		}
		t.Cleanup(stop)
		cancels = append(cancels, stop)
	}
	// Each engine reads outcomes from when its consumer exists (deliver
	// new): wait for them all, or a test's first outcomes could be missed.
	poll.CheckFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		st, err := js.Stream(context.Background(), topology.StreamOutcomes)
		if err != nil {
			return err
		}
		if c := st.CachedInfo().State.Consumers; c < n {
			return fmt.Errorf("%d of %d outcome consumers", c, n)
		}
		return nil
	})
	return &env{t: t, js: js, kv: kv, engines: engines}, cancels
}

func (e *env) destination(id, url string) {
	secret, _ := webhook.NewSecret()
	b, _ := registry.Encode(&adminv1.Destination{Id: id, TenantId: "t1", Url: url, Secret: secret, Enabled: true, Timeout: durationpb.New(time.Second)})
	dests, err := e.js.KeyValue(context.Background(), topology.BucketDestinations)
	if err != nil {
		e.t.Fatal(err)
	}
	if _, err := dests.Put(context.Background(), id, b); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) outcome(dest string, class eventv1.ErrorClass) {
	subj, _ := topology.Outcome(dest)
	b, _ := proto.Marshal(&eventv1.Outcome{DestinationId: dest, TenantId: "t1", At: timestamppb.Now(), ErrorClass: class, LatencyMs: 5, TimeoutMs: 1000})
	if _, err := e.js.Publish(context.Background(), subj, b); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) state(dest string) eventv1.State {
	entry, err := e.kv.Get(context.Background(), dest)
	if err != nil {
		return eventv1.State_STATE_HEALTHY
	}
	var d eventv1.Decision
	if err := registry.Decode(entry.Value(), &d); err != nil {
		e.t.Fatal(err)
	}
	return d.GetState()
}

func (e *env) waitState(dest string, want eventv1.State, within time.Duration) {
	e.t.Helper()
	poll.CheckFor(e.t, within, 20*time.Millisecond, func() error {
		if got := e.state(dest); got != want {
			return fmt.Errorf("%s is %v, want %v", dest, got, want)
		}
		return nil
	})
}

// waitLeader waits until some engine holds the monitor lease.
func (e *env) waitLeader() {
	e.t.Helper()
	leases, err := e.js.KeyValue(context.Background(), topology.BucketLeases)
	if err != nil {
		e.t.Fatal(err)
	}
	poll.CheckFor(e.t, 10*time.Second, 20*time.Millisecond, func() error {
		_, err := leases.Get(context.Background(), "monitor")
		return err
	})
}

// TestQuarantineProbeRecover walks a destination through the whole cycle:
// failures quarantine it, a failing probe keeps it there, a good probe
// delivers the oldest parked batch and it recovers, and once nothing older
// than the recovery is parked it is healthy again. Every step is audited.
func TestQuarantineProbeRecover(t *testing.T) {
	e, _ := startEngines(t, 1)
	var up atomic.Bool
	var probes atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		probes.Add(1)
		if !up.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(srv.Close)
	e.destination("d1", srv.URL)
	e.waitLeader()
	if err := parked.Park(context.Background(), e.js, &eventv1.Batch{BatchId: "b1", TenantId: "t1", DestinationId: "d1",
		Impressions: []*ingestv1.Impression{{Key: "k", Split: "s", Treatment: "on", Time: 1}}}, parked.Reason{Class: parked.Quarantined}, 0, "b1.d1"); err != nil {
		t.Fatal(err)
	}

	for range 5 {
		e.outcome("d1", eventv1.ErrorClass_ERROR_CLASS_SERVER)
	}
	e.waitState("d1", eventv1.State_STATE_QUARANTINED, 10*time.Second)
	poll.CheckFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		if probes.Load() == 0 {
			return fmt.Errorf("not probed yet")
		}
		return nil
	})
	if n, _, _ := parked.Stats(context.Background(), e.js, "d1"); n != 1 {
		t.Fatalf("a failed probe removed the parked batch: %d left", n)
	}
	up.Store(true)
	// The good probe delivers the parked batch, so the backlog is drained.
	e.waitState("d1", eventv1.State_STATE_HEALTHY, 30*time.Second)
	if n, _, _ := parked.Stats(context.Background(), e.js, "d1"); n != 0 {
		t.Errorf("probe batch still parked: %d", n)
	}

	// Every transition is in the audit trail, in order.
	st, err := e.js.Stream(context.Background(), topology.StreamAudit)
	if err != nil {
		t.Fatal(err)
	}
	var states []eventv1.State
	err = eachAudit(st, "imp.audit.quarantine.d1", func(d *eventv1.Decision) { states = append(states, d.GetState()) })
	if err != nil {
		t.Fatal(err)
	}
	want := []eventv1.State{eventv1.State_STATE_QUARANTINED, eventv1.State_STATE_PROBING}
	if len(states) < 4 || states[0] != want[0] || states[1] != want[1] ||
		states[len(states)-2] != eventv1.State_STATE_RECOVERING || states[len(states)-1] != eventv1.State_STATE_HEALTHY {
		t.Errorf("audited states %v", states)
	}
}

func eachAudit(st jetstream.Stream, subj string, fn func(*eventv1.Decision)) error {
	for seq := uint64(1); ; {
		raw, err := st.GetMsg(context.Background(), seq, jetstream.WithGetMsgSubject(subj))
		if err != nil {
			if err == jetstream.ErrMsgNotFound {
				return nil
			}
			return err
		}
		var d eventv1.Decision
		if err := registry.Decode(raw.Data, &d); err != nil {
			return err
		}
		fn(&d)
		seq = raw.Sequence + 1
	}
}

// TestOnlyTheLeaderDecidesAndFailoverContinues: two replicas, one decision
// per trip (not two), and after the leader stops the other one decides.
func TestOnlyTheLeaderDecidesAndFailoverContinues(t *testing.T) {
	e, stops := startEngines(t, 2)
	e.destination("d1", "http://127.0.0.1:1/")
	e.destination("d2", "http://127.0.0.1:2/")
	e.waitLeader()
	for range 5 {
		e.outcome("d1", eventv1.ErrorClass_ERROR_CLASS_CONNECT)
	}
	e.waitState("d1", eventv1.State_STATE_QUARANTINED, 10*time.Second)
	entry, err := e.kv.Get(context.Background(), "d1")
	if err != nil {
		t.Fatal(err)
	}
	var d eventv1.Decision
	if err := registry.Decode(entry.Value(), &d); err != nil {
		t.Fatal(err)
	}
	if d.GetRevision() != 1 || d.GetDecidedBy() != "policy" {
		t.Errorf("first decision: revision %d by %q", d.GetRevision(), d.GetDecidedBy())
	}

	leases, _ := e.js.KeyValue(context.Background(), topology.BucketLeases)
	held, err := leases.Get(context.Background(), "monitor")
	if err != nil {
		t.Fatal(err)
	}
	leader := string(held.Value())
	stops[map[string]int{"m0": 0, "m1": 1}[leader]]()
	poll.CheckFor(t, 15*time.Second, 50*time.Millisecond, func() error {
		e, err := leases.Get(context.Background(), "monitor")
		if err != nil || string(e.Value()) == leader {
			return fmt.Errorf("no new leader yet")
		}
		return nil
	})
	for range 5 {
		e.outcome("d2", eventv1.ErrorClass_ERROR_CLASS_CONNECT)
	}
	e.waitState("d2", eventv1.State_STATE_QUARANTINED, 10*time.Second)
}

// TestRejectedParkedBatchDoesNotKeepTheDestinationQuarantined parks a batch
// the receiver refuses (HTTP 400) and then quarantines the destination. Once
// the endpoint is up again the destination must leave quarantine (F3): the
// probe skips the rejected batch, and a 4xx to a probe would count as alive
// too. The rejected batch stays parked for an operator.
func TestRejectedParkedBatchDoesNotKeepTheDestinationQuarantined(t *testing.T) {
	e, _ := startEngines(t, 1)
	var up atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := webhook.ReadBody(r, 1<<20)
		switch items, _ := webhook.DecodeBody(body); {
		case !up.Load():
			w.WriteHeader(http.StatusServiceUnavailable)
		case len(items) > 0 && items[0].Key == "poison":
			w.WriteHeader(http.StatusBadRequest)
		default:
			w.WriteHeader(http.StatusOK)
		}
	}))
	t.Cleanup(srv.Close)
	e.destination("d1", srv.URL)
	e.waitLeader()
	park := func(id, key string, reason parked.Reason) {
		t.Helper()
		b := &eventv1.Batch{BatchId: id, TenantId: "t1", DestinationId: "d1",
			Impressions: []*ingestv1.Impression{{Key: key, Split: "s", Treatment: "on", Time: 1}}}
		if err := parked.Park(context.Background(), e.js, b, reason, 1, id+".d1"); err != nil {
			t.Fatal(err)
		}
	}
	park("bad", "poison", parked.Because(parked.Rejected, "HTTP 400: bad request"))
	park("held", "k", parked.Reason{Class: parked.Quarantined})

	for range 5 {
		e.outcome("d1", eventv1.ErrorClass_ERROR_CLASS_SERVER)
	}
	e.waitState("d1", eventv1.State_STATE_QUARANTINED, 10*time.Second)
	up.Store(true)
	poll.CheckFor(t, 30*time.Second, 50*time.Millisecond, func() error {
		if s := e.state("d1"); s == eventv1.State_STATE_QUARANTINED || s == eventv1.State_STATE_PROBING {
			return fmt.Errorf("d1 still %v", s)
		}
		return nil
	})
	// The held batch went out with the probe; the rejected one stays.
	var left []string
	if err := parked.Each(context.Background(), e.js, "d1", parked.Range{}, 0, func(m parked.Msg) error {
		left = append(left, m.Batch.GetBatchId())
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(left) != 1 || left[0] != "bad" {
		t.Errorf("parked after the probe: %v, want only the rejected batch", left)
	}
}
