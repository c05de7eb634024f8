package deliver

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

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
	"github.com/bulkhead-io/bulkhead/services/deliverer/internal/retry"
	"github.com/bulkhead-io/bulkhead/services/deliverer/internal/schedule"
)

func TestMain(m *testing.M) { leaktest.VerifyTestMain(m) }

// env is a running deliverer against a real JetStream.
type env struct {
	t     *testing.T
	js    jetstream.JetStream
	dests jetstream.KeyValue
	decs  jetstream.KeyValue
	seq   atomic.Int64
	d     *Deliverer
}

func testConfig() Config {
	p := retry.DefaultPolicy()
	p.Base, p.Max = 20*time.Millisecond, 200*time.Millisecond
	return Config{
		Workers: 4, Schedule: schedule.DefaultConfig(), Retry: p,
		AckWait: 10 * time.Second, MaxAckPending: 1000, RetryShare: 0.5,
	}
}

func start(t *testing.T, cfg Config) *env {
	t.Helper()
	return startOn(t, cfg, testkit.JetStream(t, stream.Limits{}).JS, stream.Limits{})
}

// startOn runs a deliverer on js after creating the streams with limits.
func startOn(t *testing.T, cfg Config, js jetstream.JetStream, limits stream.Limits) *env {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	if err := stream.Ensure(ctx, js, limits); err != nil {
		t.Fatal(err)
	}
	policy, err := netguard.NewPolicy([]string{"127.0.0.0/8"})
	if err != nil {
		t.Fatal(err)
	}
	client := webhook.NewClient(policy, webhook.ClientOptions{})
	log := testLogger()
	view, err := registry.Open(ctx, js, log)
	if err != nil {
		t.Fatal(err)
	}
	d, err := New(js, view, client, cfg, log, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	h := lifecycle.Start(ctx, d.Run)
	t.Cleanup(func() {
		if err := h.Stop(); err != nil {
			t.Errorf("run: %v", err)
		}
		cancel()
		view.Stop()
		client.CloseIdleConnections()
	})
	e := &env{t: t, js: js, d: d}
	if e.dests, err = js.KeyValue(ctx, topology.BucketDestinations); err != nil {
		t.Fatal(err)
	}
	if e.decs, err = js.KeyValue(ctx, topology.BucketQuarantine); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *env) destination(id, url string, timeout time.Duration) *adminv1.Destination {
	e.t.Helper()
	return e.destinationOf("t1", id, url, timeout)
}

func (e *env) destinationOf(tenant, id, url string, timeout time.Duration) *adminv1.Destination {
	e.t.Helper()
	secret, err := webhook.NewSecret()
	if err != nil {
		e.t.Fatal(err)
	}
	// Stored with its limits, as the admin API stores every destination.
	d := &adminv1.Destination{Id: id, TenantId: tenant, Url: url, Secret: secret, Enabled: true, Timeout: durationpb.New(timeout),
		MaxBatchImpressions: 100, MaxBatchBytes: 1 << 20, Linger: durationpb.New(20 * time.Millisecond)}
	b, err := registry.Encode(d)
	if err != nil {
		e.t.Fatal(err)
	}
	// Retried: on a cluster just restarted the bucket may be electing a leader.
	poll.CheckFor(e.t, 60*time.Second, 200*time.Millisecond, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := e.dests.Put(ctx, id, b)
		return err
	})
	return d
}

// publish puts n routed batches of 5 impressions on imp.deliver.<dest>,
// retrying each while a cluster is electing leaders after a fault.
func (e *env) publish(dest string, n int) []string {
	e.t.Helper()
	subj, _ := topology.Deliver(dest)
	var keys []string
	for range n {
		b := &eventv1.Batch{BatchId: fmt.Sprintf("b%d", e.seq.Add(1)), TenantId: "t1", DestinationId: dest}
		for j := range 5 {
			k := fmt.Sprintf("%s-%s-%d", dest, b.BatchId, j)
			keys = append(keys, k)
			b.Impressions = append(b.Impressions, &ingestv1.Impression{Key: k, Split: "s", Treatment: "on", Time: 1})
		}
		data, _ := proto.Marshal(b)
		poll.CheckFor(e.t, 60*time.Second, 200*time.Millisecond, func() error {
			m := nats.NewMsg(subj)
			m.Data = data
			m.Header.Set(jetstream.MsgIDHeader, b.BatchId+"."+dest)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			_, err := e.js.PublishMsg(ctx, m)
			return err
		})
	}
	return keys
}

func (e *env) decide(dest string, s eventv1.State) {
	e.t.Helper()
	b, _ := registry.Encode(&eventv1.Decision{DestinationId: dest, State: s, Reason: "test", Revision: uint64(e.seq.Add(1))})
	if _, err := e.decs.Put(context.Background(), dest, b); err != nil {
		e.t.Fatal(err)
	}
}

// inDelivery counts a destination's messages still in DELIVERY.
func (e *env) inDelivery(dest string) int {
	subj, _ := topology.Deliver(dest)
	s, err := e.js.Stream(context.Background(), topology.StreamDelivery)
	if err != nil {
		e.t.Fatal(err)
	}
	info, err := s.Info(context.Background(), jetstream.WithSubjectFilter(subj))
	if err != nil {
		e.t.Fatal(err)
	}
	return int(info.State.Subjects[subj])
}

func (e *env) parkedReasons(dest string) (int, []string) {
	var n int
	var reasons []string
	err := parked.Each(context.Background(), e.js, dest, parked.Range{}, 0, func(m parked.Msg) error {
		n += len(m.Batch.GetImpressions())
		reasons = append(reasons, m.Batch.GetParkReason())
		return nil
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return n, reasons
}

// sink is an HTTP endpoint whose answer a test controls.
type sink struct {
	srv     *httptest.Server
	mu      sync.Mutex
	keys    map[string]int
	times   []time.Time
	answer  func(n int) (int, http.Header)
	hang    chan struct{}
	secrets [][]byte
	badSigs int
}

func newSink(t *testing.T, answer func(n int) (int, http.Header)) *sink {
	s := &sink{keys: map[string]int{}, answer: answer, hang: make(chan struct{})}
	s.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := webhook.ReadBody(r, 1<<20)
		if err != nil {
			return
		}
		s.mu.Lock()
		n := len(s.times)
		s.times = append(s.times, time.Now())
		s.mu.Unlock()
		code, h := s.answer(n)
		if code == 0 { // hang
			select {
			case <-s.hang:
			case <-r.Context().Done():
			}
			return
		}
		if code/100 == 2 {
			items, _ := webhook.DecodeBody(body)
			s.mu.Lock()
			if s.secrets != nil && webhook.Verify(s.secrets, r.Header, body, time.Minute, time.Now()) != nil {
				s.badSigs++
			}
			for _, it := range items {
				s.keys[it.Key]++
			}
			s.mu.Unlock()
		}
		for k, v := range h {
			w.Header()[k] = v
		}
		w.WriteHeader(code)
	}))
	t.Cleanup(func() {
		close(s.hang)
		s.srv.CloseClientConnections()
		s.srv.Close()
	})
	return s
}

func (s *sink) received() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.keys)
}

func (s *sink) requests() []time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]time.Time(nil), s.times...)
}

func always(code int) func(int) (int, http.Header) {
	return func(int) (int, http.Header) { return code, nil }
}

func TestDeliversBatchedSignedAndAcked(t *testing.T) {
	e := start(t, testConfig())
	s := newSink(t, always(200))
	d := e.destination("d1", s.srv.URL, 2*time.Second)
	key, _ := webhook.ParseSecret(d.GetSecret())
	s.mu.Lock()
	s.secrets = [][]byte{key}
	s.mu.Unlock()
	keys := e.publish("d1", 40)
	poll.CheckFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		if got := s.received(); got != len(keys) {
			return fmt.Errorf("received %d of %d", got, len(keys))
		}
		if n := e.inDelivery("d1"); n != 0 {
			return fmt.Errorf("%d messages not acknowledged", n)
		}
		return nil
	})
	if reqs := len(s.requests()); reqs >= 40 {
		t.Errorf("%d POSTs for 40 messages: not batched", reqs)
	}
	if s.badSigs != 0 {
		t.Errorf("%d bad signatures", s.badSigs)
	}
}

func TestPermanentFailureIsParkedWithReason(t *testing.T) {
	e := start(t, testConfig())
	s := newSink(t, always(400))
	e.destination("d1", s.srv.URL, 2*time.Second)
	keys := e.publish("d1", 3)
	poll.CheckFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		n, reasons := e.parkedReasons("d1")
		if n != len(keys) {
			return fmt.Errorf("%d of %d parked", n, len(keys))
		}
		for _, r := range reasons {
			if !strings.Contains(r, "HTTP 400") {
				return fmt.Errorf("reason %q", r)
			}
		}
		return nil
	})
	if len(s.requests()) > 3 {
		t.Errorf("a 400 was retried: %d requests", len(s.requests()))
	}
	poll.CheckFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		if n := e.inDelivery("d1"); n != 0 {
			return fmt.Errorf("%d left in DELIVERY", n)
		}
		return nil
	})
}

func TestExhaustedRetriesAreParked(t *testing.T) {
	cfg := testConfig()
	cfg.Retry.MaxAttempts = 3
	e := start(t, cfg)
	s := newSink(t, always(503))
	e.destination("d1", s.srv.URL, 2*time.Second)
	keys := e.publish("d1", 1)
	poll.CheckFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		n, reasons := e.parkedReasons("d1")
		if n != len(keys) {
			return fmt.Errorf("%d of %d parked", n, len(keys))
		}
		if !strings.Contains(reasons[0], "after 3 attempts") {
			return fmt.Errorf("reason %q", reasons[0])
		}
		return nil
	})
	if got := len(s.requests()); got != 3 {
		t.Errorf("%d attempts, want 3", got)
	}
}

func TestRetryAfterIsHonoured(t *testing.T) {
	e := start(t, testConfig())
	s := newSink(t, func(n int) (int, http.Header) {
		if n == 0 {
			return 429, http.Header{"Retry-After": []string{"1"}}
		}
		return 200, nil
	})
	e.destination("d1", s.srv.URL, 2*time.Second)
	e.publish("d1", 1)
	poll.CheckFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		if s.received() != 5 {
			return fmt.Errorf("not delivered")
		}
		return nil
	})
	reqs := s.requests()
	if gap := reqs[1].Sub(reqs[0]); gap < time.Second {
		t.Errorf("retried %v after a 429 with Retry-After: 1", gap)
	}
}

func TestGoneDisablesTheDestination(t *testing.T) {
	e := start(t, testConfig())
	s := newSink(t, always(410))
	e.destination("d1", s.srv.URL, 2*time.Second)
	e.publish("d1", 1)
	poll.CheckFor(t, 20*time.Second, 50*time.Millisecond, func() error {
		entry, err := e.dests.Get(context.Background(), "d1")
		if err != nil {
			return err
		}
		var d adminv1.Destination
		if err := registry.Decode(entry.Value(), &d); err != nil {
			return err
		}
		if d.GetEnabled() || d.GetDisabledReason() == "" {
			return fmt.Errorf("still enabled")
		}
		if n, _ := e.parkedReasons("d1"); n != 5 {
			return fmt.Errorf("%d parked", n)
		}
		return nil
	})
}

// TestHangingDestinationHoldsFewWorkers: a black-holed destination must not
// delay a healthy one sharing the worker pool.
func TestHangingDestinationHoldsFewWorkers(t *testing.T) {
	e := start(t, testConfig()) // 4 workers
	hang := newSink(t, always(0))
	ok := newSink(t, always(200))
	e.destination("hang", hang.srv.URL, 10*time.Second)
	e.destination("ok", ok.srv.URL, 2*time.Second)
	e.publish("hang", 50)
	poll.CheckFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		if len(hang.requests()) == 0 {
			return fmt.Errorf("no request to the hanging destination yet")
		}
		return nil
	})
	start := time.Now()
	keys := e.publish("ok", 50)
	poll.CheckFor(t, 8*time.Second, 20*time.Millisecond, func() error {
		if got := ok.received(); got != len(keys) {
			return fmt.Errorf("healthy destination got %d of %d while the other hangs", got, len(keys))
		}
		return nil
	})
	t.Logf("healthy destination served in %v beside a hanging one", time.Since(start))
	if n := len(hang.requests()); n > 4 {
		t.Errorf("%d requests in flight to the hanging destination; the cap should hold it to a few", n)
	}
}

// TestQuarantineParksWaitingTraffic: once quarantined, a destination's
// waiting messages go to PARKED instead of being sent, freeing their slots.
func TestQuarantineParksWaitingTraffic(t *testing.T) {
	e := start(t, testConfig())
	hang := newSink(t, always(0))
	e.destination("d1", hang.srv.URL, 3*time.Second)
	keys := e.publish("d1", 30)
	poll.CheckFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		if len(hang.requests()) == 0 {
			return fmt.Errorf("no request yet")
		}
		return nil
	})
	e.decide("d1", eventv1.State_STATE_QUARANTINED)
	more := e.publish("d1", 5) // routed before the router saw the decision
	poll.CheckFor(t, 30*time.Second, 50*time.Millisecond, func() error {
		n, _ := e.parkedReasons("d1")
		if n != len(keys)+len(more) {
			return fmt.Errorf("%d of %d parked", n, len(keys)+len(more))
		}
		if left := e.inDelivery("d1"); left != 0 {
			return fmt.Errorf("%d left in DELIVERY", left)
		}
		return nil
	})
	_, reasons := e.parkedReasons("d1")
	quarantined := 0
	for _, r := range reasons {
		if r == "quarantined" {
			quarantined++
		}
	}
	if quarantined == 0 {
		t.Errorf("no batch parked as quarantined: %v", reasons)
	}
	if n := len(hang.requests()); n > 8 {
		t.Errorf("%d requests sent to a quarantined destination", n)
	}
}

func TestRetryBudget(t *testing.T) {
	var busy atomic.Int64
	for i := range 2 {
		if !takeSlot(&busy, 0.5, 4) {
			t.Fatalf("retry %d of 2 got no slot", i+1)
		}
	}
	if takeSlot(&busy, 0.5, 4) {
		t.Fatal("a third concurrent retry exceeded a 50% share of 4 workers")
	}
	busy.Add(-1)
	if !takeSlot(&busy, 0.5, 4) {
		t.Fatal("a released slot was not reusable")
	}
	if !takeSlot(new(atomic.Int64), 0.01, 4) {
		t.Fatal("a share below one worker must still allow one")
	}
}

// testLogger discards the deliverer's log unless BULKHEAD_TEST_LOG is set.
func testLogger() *slog.Logger {
	if os.Getenv("BULKHEAD_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	return slog.New(slog.DiscardHandler)
}

// TestRetryAfterBeyondTheRetryAgeWaitsInsteadOfParking: a 429 whose
// Retry-After reaches past the retry age used to park the batch at once
// (F4b). The deliverer waits what is left of the age and tries once more.
func TestRetryAfterBeyondTheRetryAgeWaitsInsteadOfParking(t *testing.T) {
	cfg := testConfig()
	cfg.Retry.MaxAge = 2 * time.Second
	e := start(t, cfg)
	s := newSink(t, func(n int) (int, http.Header) {
		if n == 0 {
			return 429, http.Header{"Retry-After": []string{"3600"}}
		}
		return 200, nil
	})
	e.destination("d1", s.srv.URL, 2*time.Second)
	e.publish("d1", 1)
	poll.CheckFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		if s.received() != 5 {
			return fmt.Errorf("not delivered; parked: %v", func() []string { _, r := e.parkedReasons("d1"); return r }())
		}
		return nil
	})
	if n, _ := e.parkedReasons("d1"); n != 0 {
		t.Errorf("%d impressions parked", n)
	}
	reqs := s.requests()
	if gap := reqs[1].Sub(reqs[0]); gap < time.Second || gap > 10*time.Second {
		t.Errorf("retried %v after the 429; want about the 2 s left of the retry age", gap)
	}
}

// TestFailingLaneOwnsOnlyItsByteBudget: a destination answering 503 with a
// long backoff waits out its retries without a worker; its lane used to
// keep pulling until max-ack-pending messages (and their bodies) were in
// memory. Now it stops at its byte budget and the rest of the backlog
// stays in DELIVERY.
func TestFailingLaneOwnsOnlyItsByteBudget(t *testing.T) {
	cfg := testConfig()
	cfg.Retry.Base, cfg.Retry.Max = 30*time.Second, 30*time.Second
	cfg.LaneMaxBytes = 256 << 10
	e := start(t, cfg)
	s := newSink(t, always(503))
	e.destination("d1", s.srv.URL, 2*time.Second)
	subj, _ := topology.Deliver("d1")
	const n, size = 100, 100 << 10 // 10 MB of backlog in 100 KB batches
	for i := range n {
		b := &eventv1.Batch{BatchId: fmt.Sprintf("b%d", i), TenantId: "t1", DestinationId: "d1",
			Impressions: []*ingestv1.Impression{{Key: fmt.Sprintf("k%d", i), Split: "s", Treatment: "on", Time: 1, Properties: strings.Repeat("x", size)}}}
		data, _ := proto.Marshal(b)
		if _, err := e.js.Publish(context.Background(), subj, data); err != nil {
			t.Fatal(err)
		}
	}
	poll.CheckFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		if len(s.requests()) < 1 {
			return fmt.Errorf("%d attempts so far", len(s.requests()))
		}
		return nil
	})
	time.Sleep(time.Second) // let the lane pull what it would
	name, _ := topology.DeliverConsumer("d1")
	c, err := e.js.Consumer(context.Background(), topology.StreamDelivery, name)
	if err != nil {
		t.Fatal(err)
	}
	info, err := c.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// Owned: the budget (3 batches) and one over; buffered by the iterator:
	// one pull of at most twice the server's max payload (1 MB here).
	if info.NumAckPending > 30 || info.NumPending < n-30 {
		t.Errorf("the lane holds %d of %d batches (%d still in DELIVERY); want at most 30 held", info.NumAckPending, n, info.NumPending)
	}
	t.Logf("held %d batches, %d in DELIVERY", info.NumAckPending, info.NumPending)
}

// TestHangingDestinationIsCutToOneWithinSeconds: a destination that
// answered quickly (its cap grown) stops answering. Within about 2 s, long
// before its 10 s timeout (and so before the monitor can see a single
// failure), its in-flight cap is one.
func TestHangingDestinationIsCutToOneWithinSeconds(t *testing.T) {
	var hanging atomic.Bool
	s := newSink(t, func(int) (int, http.Header) {
		if hanging.Load() {
			return 0, nil
		}
		return 200, nil
	})
	e := start(t, testConfig())
	e.destination("d1", s.srv.URL, 10*time.Second)
	e.publish("d1", 300)
	poll.CheckFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		if st, _ := e.d.sched.Stats("d1"); st.Cap < 3 {
			return fmt.Errorf("cap %d; growing", st.Cap)
		}
		return nil
	})
	hanging.Store(true)
	onset := time.Now()
	e.publish("d1", 300)
	poll.CheckFor(t, 6*time.Second, 20*time.Millisecond, func() error {
		if st, _ := e.d.sched.Stats("d1"); st.Cap != 1 {
			return fmt.Errorf("cap %d, %d in flight", st.Cap, st.InFlight)
		}
		return nil
	})
	if took := time.Since(onset); took > 5*time.Second {
		t.Errorf("cut to one after %v; want about 2 s", took)
	} else {
		t.Logf("cut to one %v after it stopped answering", took.Round(10*time.Millisecond))
	}
}

// TestSlowTenantLeavesThePoolToOthers: tenant "slow" has 8 destinations
// answering 200 after 1.5 s of their 2 s timeout, never quarantined. They
// may hold at most their tenant's share of the 16 workers (8 here), their
// caps shrink instead of growing, and another tenant's destination is
// served in the meantime as if they were not there.
func TestSlowTenantLeavesThePoolToOthers(t *testing.T) {
	var now, peak atomic.Int32
	slow := newSink(t, func(int) (int, http.Header) {
		if n := now.Add(1); n > peak.Load() {
			peak.Store(n)
		}
		time.Sleep(1500 * time.Millisecond)
		now.Add(-1)
		return 200, nil
	})
	fast := newSink(t, always(200))
	cfg := testConfig()
	cfg.Workers = 16
	cfg.Schedule.TenantMaxInFlight = 8
	e := start(t, cfg)
	for i := range 8 {
		id := fmt.Sprintf("slow%d", i)
		e.destinationOf("slow", id, slow.srv.URL, 2*time.Second)
	}
	e.destinationOf("quiet", "quiet", fast.srv.URL, 2*time.Second)
	for i := range 8 {
		e.publish(fmt.Sprintf("slow%d", i), 40)
	}
	poll.CheckFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		if now.Load() < 6 {
			return fmt.Errorf("%d slow requests in flight", now.Load())
		}
		return nil
	})
	start := time.Now()
	keys := e.publish("quiet", 100)
	poll.CheckFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		if got := fast.received(); got != len(keys) {
			return fmt.Errorf("quiet destination got %d of %d", got, len(keys))
		}
		return nil
	})
	took := time.Since(start)
	if took > 3*time.Second {
		t.Errorf("the quiet tenant waited %v beside the slow one", took)
	}
	if p := peak.Load(); p > 8 {
		t.Errorf("the slow tenant held %d workers at once; its share is 8", p)
	}
	for i := range 8 {
		if st, _ := e.d.sched.Stats(fmt.Sprintf("slow%d", i)); st.Cap > 2 {
			t.Errorf("slow%d's cap grew to %d on answers near its timeout", i, st.Cap)
		}
	}
	t.Logf("quiet tenant served in %v; slow tenant peaked at %d workers", took.Round(time.Millisecond), peak.Load())
}

// TestReplaysKeepToTheirShare: a recovering destination's replayed backlog
// (message ids from parked.Replay) is delivered with at most ReplayShare of
// the workers at once, while fresh traffic of another destination is
// delivered beside it.
func TestReplaysKeepToTheirShare(t *testing.T) {
	var now, peak atomic.Int32
	slow := newSink(t, func(int) (int, http.Header) {
		if n := now.Add(1); n > peak.Load() {
			peak.Store(n)
		}
		time.Sleep(300 * time.Millisecond)
		now.Add(-1)
		return 200, nil
	})
	fresh := newSink(t, always(200))
	cfg := testConfig()
	cfg.Workers, cfg.ReplayShare = 8, 0.25 // two replay workers
	cfg.Schedule.TenantMaxInFlight = 8
	e := start(t, cfg)
	for i := range 4 {
		e.destinationOf(fmt.Sprintf("r%d", i), fmt.Sprintf("rec%d", i), slow.srv.URL, 2*time.Second)
	}
	e.destinationOf("f", "fresh", fresh.srv.URL, 2*time.Second)
	for i := range 4 {
		subj, _ := topology.Deliver(fmt.Sprintf("rec%d", i))
		for j := range 10 {
			b := &eventv1.Batch{BatchId: fmt.Sprintf("p%d-%d", i, j), TenantId: fmt.Sprintf("r%d", i), DestinationId: fmt.Sprintf("rec%d", i),
				Impressions: []*ingestv1.Impression{{Key: fmt.Sprintf("k%d-%d", i, j), Split: "s", Treatment: "on", Time: 1}}}
			data, _ := proto.Marshal(b)
			m := nats.NewMsg(subj)
			m.Data = data
			m.Header.Set(jetstream.MsgIDHeader, fmt.Sprintf("%s%d", parked.ReplayIDPrefix, i*100+j))
			if _, err := e.js.PublishMsg(context.Background(), m); err != nil {
				t.Fatal(err)
			}
		}
	}
	keys := e.publish("fresh", 50)
	poll.CheckFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		if got := fresh.received(); got != len(keys) {
			return fmt.Errorf("fresh destination got %d of %d", got, len(keys))
		}
		return nil
	})
	poll.CheckFor(t, 30*time.Second, 50*time.Millisecond, func() error {
		if got := slow.received(); got != 40 {
			return fmt.Errorf("replays delivered %d of 40", got)
		}
		return nil
	})
	if p := peak.Load(); p > 2 {
		t.Errorf("replays held %d workers at once; their share is 2 of 8", p)
	}
}
