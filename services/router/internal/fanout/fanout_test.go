package fanout

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/testkit"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type fixture struct {
	js   jetstream.JetStream
	decs jetstream.KeyValue
	reg  *registry.Registry
}

// start creates the streams, fills the destinations bucket (and the
// quarantine bucket with decisions), watches both into a registry and runs a
// router until the test ends.
func start(t *testing.T, dests []*adminv1.Destination, decisions []*eventv1.Decision) *fixture {
	t.Helper()
	return startWith(t, stream.Limits{}, dests, decisions)
}

func startWith(t *testing.T, limits stream.Limits, dests []*adminv1.Destination, decisions []*eventv1.Decision) *fixture {
	t.Helper()
	return startCfg(t, Config{Workers: 2, AckWait: 30 * time.Second, MaxAckPending: 100, PublishTimeout: 10 * time.Second}, limits, dests, decisions)
}

func startCfg(t *testing.T, cfg Config, limits stream.Limits, dests []*adminv1.Destination, decisions []*eventv1.Decision) *fixture {
	t.Helper()
	tk := testkit.JetStream(t, limits)
	js, destKV, decKV := tk.JS, tk.Destinations, tk.Decisions
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	sctx, scancel := context.WithTimeout(ctx, 30*time.Second)
	defer scancel()
	for _, d := range dests {
		b, _ := registry.Encode(d)
		if _, err := destKV.Put(sctx, d.GetId(), b); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range decisions {
		if _, err := registry.PutDecision(sctx, decKV, d, 0); err != nil {
			t.Fatal(err)
		}
	}
	log := slog.New(slog.DiscardHandler)
	reg, err := registry.Open(ctx, js, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(reg.Stop) // after the router has stopped (cleanups run last first)
	r, err := New(js, reg, cfg, log, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
	return &fixture{js: js, decs: decKV, reg: reg}
}

func imp(key, split string) *ingestv1.Impression {
	return &ingestv1.Impression{Key: key, Split: split, Treatment: "on", Time: 1700000000000}
}

// submit stores a batch on imp.in.<tenant> as ingest would; msgID is the
// ingest de-duplication id.
func (f *fixture) submit(t *testing.T, b *eventv1.Batch, msgID string) {
	t.Helper()
	data, err := proto.Marshal(b)
	if err != nil {
		t.Fatal(err)
	}
	subj, _ := topology.In(b.GetTenantId())
	m := nats.NewMsg(subj)
	m.Data = data
	m.Header.Set(jetstream.MsgIDHeader, msgID)
	if _, err := f.js.PublishMsg(context.Background(), m); err != nil {
		t.Fatal(err)
	}
}

// on returns the batches stored on subj in streamName, with their message ids.
func (f *fixture) on(t *testing.T, streamName, subj string) ([]*eventv1.Batch, []string) {
	t.Helper()
	ctx := context.Background()
	s, err := f.js.Stream(ctx, streamName)
	if err != nil {
		t.Fatal(err)
	}
	var out []*eventv1.Batch
	var ids []string
	for seq := uint64(1); ; {
		m, err := s.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(subj))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return out, ids
		}
		if err != nil {
			t.Fatal(err)
		}
		var b eventv1.Batch
		if err := proto.Unmarshal(m.Data, &b); err != nil {
			t.Fatal(err)
		}
		out = append(out, &b)
		ids = append(ids, m.Header.Get(jetstream.MsgIDHeader))
		seq = m.Sequence + 1
	}
}

// routed waits until the router consumer has nothing pending or unacknowledged.
func (f *fixture) routed(t *testing.T) {
	t.Helper()
	poll.CheckFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		c, err := f.js.Consumer(context.Background(), topology.StreamImpressions, topology.ConsumerRouter)
		if err != nil {
			return err
		}
		info, err := c.Info(context.Background())
		if err != nil {
			return err
		}
		if info.NumPending != 0 || info.NumAckPending != 0 || info.Delivered.Consumer == 0 {
			return fmt.Errorf("pending %d, ack pending %d, delivered %d", info.NumPending, info.NumAckPending, info.Delivered.Consumer)
		}
		return nil
	})
	// IMPRESSIONS is a work queue: acknowledged input is removed.
	s, err := f.js.Stream(context.Background(), topology.StreamImpressions)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 0 {
		t.Errorf("IMPRESSIONS still holds %d messages after routing", info.State.Msgs)
	}
}

func keys(b *eventv1.Batch) []string {
	var out []string
	for _, i := range b.GetImpressions() {
		out = append(out, i.GetKey())
	}
	return out
}

func TestFanOut(t *testing.T) {
	f := start(t,
		[]*adminv1.Destination{
			{Id: "all", TenantId: "t1", Url: "https://example.com/a", Enabled: true},
			{Id: "only-a", TenantId: "t1", Url: "https://example.com/b", Enabled: true, Filter: &adminv1.Filter{Splits: []string{"a"}}},
			{Id: "only-z", TenantId: "t1", Url: "https://example.com/z", Enabled: true, Filter: &adminv1.Filter{Splits: []string{"z"}}},
			{Id: "paused", TenantId: "t1", Url: "https://example.com/p", Enabled: true},
			{Id: "quarantined", TenantId: "t1", Url: "https://example.com/q", Enabled: true},
			{Id: "recovering", TenantId: "t1", Url: "https://example.com/r", Enabled: true},
			{Id: "disabled", TenantId: "t1", Url: "https://example.com/d", Enabled: false},
			{Id: "other-tenant", TenantId: "t2", Url: "https://example.com/o", Enabled: true},
		},
		[]*eventv1.Decision{
			{DestinationId: "paused", TenantId: "t1", State: eventv1.State_STATE_PAUSED, Revision: 1},
			{DestinationId: "quarantined", TenantId: "t1", State: eventv1.State_STATE_QUARANTINED, Revision: 1},
			{DestinationId: "recovering", TenantId: "t1", State: eventv1.State_STATE_RECOVERING, Revision: 2},
		})
	in := &eventv1.Batch{BatchId: "b1", TenantId: "t1", AcceptedAt: timestamppb.Now(),
		Impressions: []*ingestv1.Impression{imp("u1", "a"), imp("u2", "b"), imp("u3", "a")}}
	f.submit(t, in, "ingest-b1")
	f.routed(t)

	for _, tc := range []struct {
		dest   string
		stream string // "" : nothing anywhere
		keys   []string
		reason string
	}{
		{"all", topology.StreamDelivery, []string{"u1", "u2", "u3"}, ""},
		{"only-a", topology.StreamDelivery, []string{"u1", "u3"}, ""},
		{"recovering", topology.StreamDelivery, []string{"u1", "u2", "u3"}, ""},
		{"paused", topology.StreamParked, []string{"u1", "u2", "u3"}, "paused"},
		{"quarantined", topology.StreamParked, []string{"u1", "u2", "u3"}, "quarantined"},
		{"disabled", topology.StreamParked, []string{"u1", "u2", "u3"}, "destination disabled"},
		{"only-z", "", nil, ""},
		{"other-tenant", "", nil, ""},
	} {
		t.Run(tc.dest, func(t *testing.T) {
			deliverSubj, _ := topology.Deliver(tc.dest)
			parkedSubj, _ := topology.Parked(tc.dest)
			delivered, dids := f.on(t, topology.StreamDelivery, deliverSubj)
			parkedB, pids := f.on(t, topology.StreamParked, parkedSubj)
			var got []*eventv1.Batch
			var ids []string
			switch tc.stream {
			case topology.StreamDelivery:
				got, ids = delivered, dids
				if len(parkedB) != 0 {
					t.Errorf("also parked: %v", parkedB)
				}
			case topology.StreamParked:
				got, ids = parkedB, pids
				if len(delivered) != 0 {
					t.Errorf("also delivered: %v", delivered)
				}
			default:
				if len(delivered)+len(parkedB) != 0 {
					t.Errorf("got traffic it should not: %v %v", delivered, parkedB)
				}
				return
			}
			if len(got) != 1 {
				t.Fatalf("%d batches on %s, want 1", len(got), tc.stream)
			}
			b := got[0]
			if !slices.Equal(keys(b), tc.keys) {
				t.Errorf("impressions %v, want %v", keys(b), tc.keys)
			}
			if b.GetBatchId() != "b1" || b.GetTenantId() != "t1" || b.GetDestinationId() != tc.dest ||
				!proto.Equal(b.GetAcceptedAt(), in.GetAcceptedAt()) || b.GetParkReason() != tc.reason {
				t.Errorf("batch = %v", b)
			}
			if ids[0] != "b1."+tc.dest {
				t.Errorf("message id %q, want b1.%s", ids[0], tc.dest)
			}
		})
	}
}

func TestRedeliveredInputIsNotDuplicated(t *testing.T) {
	f := start(t,
		[]*adminv1.Destination{
			{Id: "d1", TenantId: "t1", Url: "https://example.com/1", Enabled: true},
			{Id: "held", TenantId: "t1", Url: "https://example.com/2", Enabled: true},
		},
		[]*eventv1.Decision{{DestinationId: "held", TenantId: "t1", State: eventv1.State_STATE_PAUSED}})
	in := &eventv1.Batch{BatchId: "b1", TenantId: "t1", Impressions: []*ingestv1.Impression{imp("u1", "a")}}
	// The same accepted batch handed to the router twice, as after a crash
	// between publishing the outputs and acknowledging the input.
	f.submit(t, in, "ingest-1")
	f.routed(t)
	f.submit(t, in, "ingest-2")
	poll.CheckFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		c, err := f.js.Consumer(context.Background(), topology.StreamImpressions, topology.ConsumerRouter)
		if err != nil {
			return err
		}
		info, err := c.Info(context.Background())
		if err != nil {
			return err
		}
		if info.Delivered.Consumer < 2 || info.NumPending+uint64(info.NumAckPending) != 0 {
			return fmt.Errorf("second copy not routed yet: %+v", info.Delivered)
		}
		return nil
	})
	if got, _ := f.on(t, topology.StreamDelivery, "imp.deliver.d1"); len(got) != 1 {
		t.Errorf("imp.deliver.d1 holds %d batches, want 1", len(got))
	}
	if got, _ := f.on(t, topology.StreamParked, "imp.parked.held"); len(got) != 1 {
		t.Errorf("imp.parked.held holds %d batches, want 1", len(got))
	}
}

func TestNewDecisionIsEnforced(t *testing.T) {
	f := start(t, []*adminv1.Destination{{Id: "d1", TenantId: "t1", Url: "https://example.com/1", Enabled: true}}, nil)
	f.submit(t, &eventv1.Batch{BatchId: "before", TenantId: "t1", Impressions: []*ingestv1.Impression{imp("u1", "a")}}, "1")
	f.routed(t)

	if _, err := registry.PutDecision(context.Background(), f.decs, &eventv1.Decision{DestinationId: "d1", TenantId: "t1", State: eventv1.State_STATE_QUARANTINED}, 0); err != nil {
		t.Fatal(err)
	}
	poll.CheckFor(t, 10*time.Second, 10*time.Millisecond, func() error {
		if !registry.Held(f.reg.State("d1")) {
			return errors.New("decision not seen by the registry")
		}
		return nil
	})
	f.submit(t, &eventv1.Batch{BatchId: "after", TenantId: "t1", Impressions: []*ingestv1.Impression{imp("u2", "a")}}, "2")
	poll.CheckFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		if got, _ := f.on(t, topology.StreamParked, "imp.parked.d1"); len(got) != 1 || got[0].GetBatchId() != "after" {
			return fmt.Errorf("parked %v", got)
		}
		return nil
	})
	delivered, _ := f.on(t, topology.StreamDelivery, "imp.deliver.d1")
	if len(delivered) != 1 || delivered[0].GetBatchId() != "before" {
		t.Errorf("delivered %v, want only the batch from before the quarantine", delivered)
	}
}

func TestCorruptInputIsTerminated(t *testing.T) {
	f := start(t, []*adminv1.Destination{{Id: "d1", TenantId: "t1", Url: "https://example.com/1", Enabled: true}}, nil)
	if _, err := f.js.Publish(context.Background(), "imp.in.t1", []byte{0xff, 0xff, 0xff}); err != nil {
		t.Fatal(err)
	}
	f.submit(t, &eventv1.Batch{BatchId: "ok", TenantId: "t1", Impressions: []*ingestv1.Impression{imp("u1", "a")}}, "ok")
	// The corrupt message does not block the one behind it.
	poll.CheckFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		if got, _ := f.on(t, topology.StreamDelivery, "imp.deliver.d1"); len(got) != 1 {
			return fmt.Errorf("delivered %d", len(got))
		}
		return nil
	})
	f.routed(t)
}

func TestFullDeliveryStreamRetriesWithoutDuplicates(t *testing.T) {
	f := startWith(t, stream.Limits{DeliveryMaxBytes: 512},
		[]*adminv1.Destination{
			{Id: "d1", TenantId: "t1", Url: "https://example.com/1", Enabled: true},
			{Id: "held", TenantId: "t1", Url: "https://example.com/2", Enabled: true},
		},
		[]*eventv1.Decision{{DestinationId: "held", TenantId: "t1", State: eventv1.State_STATE_PAUSED}})
	// Fill DELIVERY so d1's share is refused while held's share is parked.
	filler, err := f.js.Publish(context.Background(), "imp.deliver.filler", make([]byte, 400))
	if err != nil {
		t.Fatal(err)
	}
	f.submit(t, &eventv1.Batch{BatchId: "b1", TenantId: "t1", Impressions: []*ingestv1.Impression{imp("u1", "a")}}, "b1")

	// The input is handed back and redelivered, not acknowledged or dropped.
	poll.CheckFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		c, err := f.js.Consumer(context.Background(), topology.StreamImpressions, topology.ConsumerRouter)
		if err != nil {
			return err
		}
		info, err := c.Info(context.Background())
		if err != nil {
			return err
		}
		if info.NumRedelivered == 0 && info.Delivered.Consumer < 2 {
			return fmt.Errorf("not redelivered yet: %+v", info.Delivered)
		}
		return nil
	})
	if got, _ := f.on(t, topology.StreamDelivery, "imp.deliver.d1"); len(got) != 0 {
		t.Fatalf("d1 got %d batches through a full stream", len(got))
	}

	// Room again: the next redelivery completes, and the share that was
	// already parked on the first attempt is not parked twice.
	s, err := f.js.Stream(context.Background(), topology.StreamDelivery)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteMsg(context.Background(), filler.Sequence); err != nil {
		t.Fatal(err)
	}
	f.routed(t)
	if got, _ := f.on(t, topology.StreamDelivery, "imp.deliver.d1"); len(got) != 1 {
		t.Errorf("imp.deliver.d1 holds %d batches, want 1", len(got))
	}
	if got, _ := f.on(t, topology.StreamParked, "imp.parked.held"); len(got) != 1 {
		t.Errorf("imp.parked.held holds %d batches, want 1", len(got))
	}
}

// A destination stored before a batch was accepted gets that batch, however
// soon after: the router waits for its view to be current, it does not route
// with whatever the watch has delivered so far.
func TestDestinationCreatedJustBeforeABatchGetsIt(t *testing.T) {
	f := start(t, nil, nil)
	ctx := context.Background()
	destKV, err := f.js.KeyValue(ctx, topology.BucketDestinations)
	if err != nil {
		t.Fatal(err)
	}
	const n = 50
	for i := range n {
		id, tenant := fmt.Sprintf("d%d", i), fmt.Sprintf("t%d", i)
		b, _ := registry.Encode(&adminv1.Destination{Id: id, TenantId: tenant, Url: "https://example.com/" + id, Enabled: true})
		if _, err := destKV.Put(ctx, id, b); err != nil {
			t.Fatal(err)
		}
		f.submit(t, &eventv1.Batch{BatchId: "b" + id, TenantId: tenant, Impressions: []*ingestv1.Impression{imp("k"+id, "s")}}, "b"+id)
	}
	f.routed(t)
	for i := range n {
		subj, _ := topology.Deliver(fmt.Sprintf("d%d", i))
		if got, _ := f.on(t, topology.StreamDelivery, subj); len(got) != 1 {
			t.Errorf("d%d: %d batches on %s, want the one submitted right after it was created", i, len(got), subj)
		}
	}
}

// TestRouterKeepsRoutingWhenItsSubscriptionEnds deletes the routers' shared
// consumer under a running router, as an operator's mistake or the loss of
// an R1 node would. The router must create it again and route what comes
// next, not stop (or exit) with the backlog growing behind it.
func TestRouterKeepsRoutingWhenItsSubscriptionEnds(t *testing.T) {
	f := start(t, []*adminv1.Destination{{Id: "d", TenantId: "t1", Url: "https://example.com/d", Enabled: true}}, nil)
	f.submit(t, &eventv1.Batch{BatchId: "b1", TenantId: "t1", Impressions: []*ingestv1.Impression{imp("u1", "a")}}, "ingest-b1")
	f.routed(t)
	if err := f.js.DeleteConsumer(context.Background(), topology.StreamImpressions, topology.ConsumerRouter); err != nil {
		t.Fatal(err)
	}
	f.submit(t, &eventv1.Batch{BatchId: "b2", TenantId: "t1", Impressions: []*ingestv1.Impression{imp("u2", "a")}}, "ingest-b2")
	subj, _ := topology.Deliver("d")
	poll.CheckFor(t, 30*time.Second, 50*time.Millisecond, func() error {
		if got, _ := f.on(t, topology.StreamDelivery, subj); len(got) != 2 {
			return fmt.Errorf("%d of 2 batches routed after the consumer was deleted", len(got))
		}
		return nil
	})
	f.routed(t)
}

// TestOverBudgetDestinationIsParkedAlone: a destination whose DELIVERY
// backlog is at its budget gets its share parked, with that reason; the
// batch's other destination is delivered as usual and the input is done.
func TestOverBudgetDestinationIsParkedAlone(t *testing.T) {
	f := startWith(t, stream.Limits{DestinationBacklog: 2},
		[]*adminv1.Destination{
			{Id: "slow", TenantId: "t1", Url: "https://example.com/s", Enabled: true},
			{Id: "fast", TenantId: "t1", Url: "https://example.com/f", Enabled: true},
		}, nil)
	for i := range 2 {
		if _, err := f.js.Publish(context.Background(), "imp.deliver.slow", []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	f.submit(t, &eventv1.Batch{BatchId: "b1", TenantId: "t1", Impressions: []*ingestv1.Impression{imp("u1", "a")}}, "b1")
	f.routed(t)
	if got, _ := f.on(t, topology.StreamDelivery, "imp.deliver.fast"); len(got) != 1 {
		t.Errorf("fast: %d batches delivered, want 1", len(got))
	}
	got, ids := f.on(t, topology.StreamParked, "imp.parked.slow")
	if len(got) != 1 || got[0].GetParkReason() != parked.OverBudget.String() || ids[0] != "b1.slow" {
		t.Fatalf("slow parked %v (ids %v), want b1 with reason %q", got, ids, parked.OverBudget)
	}
	if !slices.Equal(keys(got[0]), []string{"u1"}) {
		t.Errorf("parked impressions %v", keys(got[0]))
	}
}

// TestUnstorableOutputIsHandedBackAlone: one destination's output cannot be
// stored at all (its PARKED share is full). The other destination's output
// is stored once, the input is acknowledged, and only the stuck output
// waits, as a remainder in the tenant's share of IMPRESSIONS, until there is
// room; then it is stored, and nothing else twice.
func TestUnstorableOutputIsHandedBackAlone(t *testing.T) {
	f := startWith(t, stream.Limits{DestinationParked: 1},
		[]*adminv1.Destination{
			{Id: "d1", TenantId: "t1", Url: "https://example.com/1", Enabled: true},
			{Id: "held", TenantId: "t1", Url: "https://example.com/2", Enabled: true},
		},
		[]*eventv1.Decision{{DestinationId: "held", TenantId: "t1", State: eventv1.State_STATE_PAUSED}})
	filler, err := f.js.Publish(context.Background(), "imp.parked.held", []byte("filler"))
	if err != nil {
		t.Fatal(err)
	}
	f.submit(t, &eventv1.Batch{BatchId: "b1", TenantId: "t1", Impressions: []*ingestv1.Impression{imp("u1", "a")}}, "b1")

	// The remainder names only "held", and keeps coming back while d1's
	// output, stored once, is not published again.
	ctx := context.Background()
	in, err := f.js.Stream(ctx, topology.StreamImpressions)
	if err != nil {
		t.Fatal(err)
	}
	poll.CheckFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		m, err := in.GetLastMsgForSubject(ctx, "imp.in.t1")
		if err != nil {
			return err
		}
		if got := m.Header.Get(topology.HeaderTargets); got != "held" {
			return fmt.Errorf("last input has targets %q, want the remainder for held", got)
		}
		c, err := f.js.Consumer(ctx, topology.StreamImpressions, topology.ConsumerRouter)
		if err != nil {
			return err
		}
		info, err := c.Info(ctx)
		if err != nil {
			return err
		}
		if info.Delivered.Consumer < 4 {
			return fmt.Errorf("remainder tried %d times so far", info.Delivered.Consumer-1)
		}
		return nil
	})
	if got, _ := f.on(t, topology.StreamDelivery, "imp.deliver.d1"); len(got) != 1 {
		t.Fatalf("d1 holds %d batches, want 1", len(got))
	}
	info, err := in.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 1 {
		t.Fatalf("IMPRESSIONS holds %d messages; want only the remainder", info.State.Msgs)
	}

	p, err := f.js.Stream(ctx, topology.StreamParked)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.DeleteMsg(ctx, filler.Sequence); err != nil {
		t.Fatal(err)
	}
	f.routed(t)
	if got, _ := f.on(t, topology.StreamParked, "imp.parked.held"); len(got) != 1 || got[0].GetBatchId() != "b1" || !slices.Equal(keys(got[0]), []string{"u1"}) {
		t.Errorf("held parked %v, want b1", got)
	}
	if got, _ := f.on(t, topology.StreamDelivery, "imp.deliver.d1"); len(got) != 1 {
		t.Errorf("d1 holds %d batches after the remainder, want 1", len(got))
	}
}

// TestManyDestinationsArePublishedInWaves: a batch whose tenant has more
// destinations than one wave (here 1,000 workers leave waves of 2) is
// stored to every one of them, in waves, so one batch never fills the
// connection's window of unacknowledged publishes that all workers share.
func TestManyDestinationsArePublishedInWaves(t *testing.T) {
	var dests []*adminv1.Destination
	for i := range 7 {
		dests = append(dests, &adminv1.Destination{Id: fmt.Sprintf("d%d", i), TenantId: "t1", Url: "https://example.com/", Enabled: true})
	}
	f := startCfg(t, Config{Workers: 1000, AckWait: 30 * time.Second, MaxAckPending: 100, PublishTimeout: 10 * time.Second}, stream.Limits{}, dests, nil)
	f.submit(t, &eventv1.Batch{BatchId: "b1", TenantId: "t1", Impressions: []*ingestv1.Impression{imp("u1", "a")}}, "b1")
	f.routed(t)
	for i := range 7 {
		if got, _ := f.on(t, topology.StreamDelivery, fmt.Sprintf("imp.deliver.d%d", i)); len(got) != 1 {
			t.Errorf("d%d: %d batches, want 1", i, len(got))
		}
	}
}
