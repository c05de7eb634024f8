package registry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/natstest"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/testkit"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// setup starts JetStream with Bulkhead's buckets and returns them.
func setup(t *testing.T) (jetstream.JetStream, jetstream.KeyValue, jetstream.KeyValue) {
	t.Helper()
	tk := testkit.JetStream(t, stream.Limits{})
	return tk.JS, tk.Destinations, tk.Decisions
}

func putDest(t *testing.T, kv jetstream.KeyValue, id, tenant string) {
	t.Helper()
	b, err := Encode(&adminv1.Destination{Id: id, TenantId: tenant, Url: "https://example.com/" + id, Enabled: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(context.Background(), id, b); err != nil {
		t.Fatal(err)
	}
}

func putDecision(t *testing.T, kv jetstream.KeyValue, id string, st eventv1.State) {
	t.Helper()
	b, err := Encode(&eventv1.Decision{DestinationId: id, TenantId: "t1", State: st, Reason: "test"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(context.Background(), id, b); err != nil {
		t.Fatal(err)
	}
}

// recorder keeps every Change in the order onChange saw it.
type recorder struct {
	mu      sync.Mutex
	changes []Change
}

func (r *recorder) onChange(c Change) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.changes = append(r.changes, c)
}

// summary renders the changes of one kind as "id:op" strings.
func (r *recorder) summary(kind Kind) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, c := range r.changes {
		if c.Kind != kind {
			continue
		}
		switch {
		case c.Deleted:
			out = append(out, c.ID+":del")
		case kind == DestinationChanged:
			out = append(out, c.ID+":"+c.Destination.GetTenantId())
		default:
			out = append(out, c.ID+":"+c.Decision.GetState().String())
		}
	}
	return out
}

// openView opens a registry and, with onChange, feeds it every change of a
// subscription until the test ends.
func openView(t *testing.T, js jetstream.JetStream, onChange func(Change)) *Registry {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	r, err := Open(ctx, js, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(r.Stop)
	if onChange != nil {
		feed(t, r.Subscribe(), onChange)
	}
	return r
}

// feed calls onChange for every change of sub until the test ends.
func feed(t *testing.T, sub *Subscription, onChange func(Change)) {
	done, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			select {
			case <-done:
				return
			case <-sub.Ready():
				for _, c := range sub.Take() {
					onChange(c)
				}
			}
		}
	}()
	t.Cleanup(func() { sub.Close(); close(done); <-stopped })
}

func ids(ds []*adminv1.Destination) []string {
	out := make([]string, 0, len(ds))
	for _, d := range ds {
		out = append(out, d.GetId())
	}
	slices.Sort(out)
	return out
}

func TestWatchLoadsCurrentValues(t *testing.T) {
	js, dests, decs := setup(t)
	putDest(t, dests, "d1", "t1")
	putDest(t, dests, "d2", "t1")
	putDest(t, dests, "d3", "t2")
	putDest(t, dests, "gone", "t2")
	if err := dests.Delete(context.Background(), "gone"); err != nil {
		t.Fatal(err)
	}
	putDecision(t, decs, "d1", eventv1.State_STATE_QUARANTINED)

	rec := &recorder{}
	r := openView(t, js, rec.onChange)

	// Watch returns only once the current values are loaded: no polling.
	if got := ids(r.ForTenant("t1")); !slices.Equal(got, []string{"d1", "d2"}) {
		t.Errorf("ForTenant(t1) = %v, want [d1 d2]", got)
	}
	if got := ids(r.ForTenant("t2")); !slices.Equal(got, []string{"d3"}) {
		t.Errorf("ForTenant(t2) = %v, want [d3]", got)
	}
	if got := ids(r.Destinations()); !slices.Equal(got, []string{"d1", "d2", "d3"}) {
		t.Errorf("Destinations() = %v", got)
	}
	if r.Destination("gone") != nil {
		t.Error("deleted destination is in the view")
	}
	if got := r.Destination("d3").GetUrl(); got != "https://example.com/d3" {
		t.Errorf("d3 url = %q", got)
	}
	if got := r.State("d1"); got != eventv1.State_STATE_QUARANTINED {
		t.Errorf("State(d1) = %v, want QUARANTINED", got)
	}
	if got := r.State("d2"); got != eventv1.State_STATE_HEALTHY {
		t.Errorf("State(d2) = %v, want HEALTHY", got)
	}
	// A subscription starts with the view as it is (delivered by the
	// feeding goroutine, so wait for it).
	wantDest := []string{"d1:t1", "d2:t1", "d3:t2"}
	poll.CheckFor(t, 10*time.Second, 10*time.Millisecond, func() error {
		if got := rec.summary(DestinationChanged); !slices.Equal(got, wantDest) {
			return fmt.Errorf("initial destination changes = %v, want %v", got, wantDest)
		}
		if got := rec.summary(DecisionChanged); !slices.Equal(got, []string{"d1:STATE_QUARANTINED"}) {
			return fmt.Errorf("initial decision changes = %v", got)
		}
		return nil
	})
}

func TestWatchFollowsLiveChanges(t *testing.T) {
	js, dests, decs := setup(t)
	rec := &recorder{}
	r := openView(t, js, rec.onChange)
	if len(r.Destinations()) != 0 {
		t.Fatalf("empty buckets gave %v", ids(r.Destinations()))
	}

	check := func(what string, fn func() error) {
		t.Helper()
		poll.CheckFor(t, 10*time.Second, 10*time.Millisecond, func() error {
			if err := fn(); err != nil {
				return fmt.Errorf("%s: %w", what, err)
			}
			return nil
		})
	}
	want := func(tenant string, w ...string) func() error {
		return func() error {
			if got := ids(r.ForTenant(tenant)); !slices.Equal(got, w) && !(len(got) == 0 && len(w) == 0) {
				return fmt.Errorf("ForTenant(%s) = %v, want %v", tenant, got, w)
			}
			return nil
		}
	}

	putDest(t, dests, "d1", "t1")
	putDest(t, dests, "d2", "t1")
	check("add", want("t1", "d1", "d2"))

	// Moving d2 to t2 must take it out of t1's list, not just add it to t2's.
	putDest(t, dests, "d2", "t2")
	check("update tenant", func() error {
		if err := want("t1", "d1")(); err != nil {
			return err
		}
		return want("t2", "d2")()
	})

	if err := dests.Delete(context.Background(), "d1"); err != nil {
		t.Fatal(err)
	}
	check("delete", func() error {
		if r.Destination("d1") != nil {
			return errors.New("d1 still present")
		}
		return want("t1")()
	})
	if _, ok := r.byTenant["t1"]; ok {
		t.Error("empty tenant list kept after its last destination was deleted")
	}

	putDecision(t, decs, "d2", eventv1.State_STATE_PAUSED)
	check("pause", func() error {
		if !Held(r.State("d2")) {
			return fmt.Errorf("State(d2) = %v, want held", r.State("d2"))
		}
		return nil
	})
	putDecision(t, decs, "d2", eventv1.State_STATE_RECOVERING)
	check("recover", func() error {
		if s := r.State("d2"); s != eventv1.State_STATE_RECOVERING {
			return fmt.Errorf("State(d2) = %v", s)
		}
		return nil
	})
	if err := decs.Delete(context.Background(), "d2"); err != nil {
		t.Fatal(err)
	}
	check("decision deleted", func() error {
		if r.Decision("d2") != nil {
			return errors.New("decision still present")
		}
		return nil
	})
	if s := r.State("d2"); s != eventv1.State_STATE_HEALTHY {
		t.Errorf("State without decision = %v, want HEALTHY", s)
	}

	// The subscriber saw every change, in the order it was made.
	wantDest := []string{"d1:t1", "d2:t1", "d2:t2", "d1:del"}
	wantDec := []string{"d2:STATE_PAUSED", "d2:STATE_RECOVERING", "d2:del"}
	check("subscriber", func() error {
		if got := rec.summary(DestinationChanged); !slices.Equal(got, wantDest) {
			return fmt.Errorf("destination changes = %v, want %v", got, wantDest)
		}
		if got := rec.summary(DecisionChanged); !slices.Equal(got, wantDec) {
			return fmt.Errorf("decision changes = %v, want %v", got, wantDec)
		}
		return nil
	})
}

func TestWatchIgnoresUndecodableValues(t *testing.T) {
	js, dests, _ := setup(t)
	rec := &recorder{}
	r := openView(t, js, rec.onChange)
	if _, err := dests.Put(context.Background(), "bad", []byte("{not json")); err != nil {
		t.Fatal(err)
	}
	putDest(t, dests, "good", "t1")
	// The subscriber sees changes after the view: wait for both.
	poll.CheckFor(t, 10*time.Second, 10*time.Millisecond, func() error {
		if r.Destination("good") == nil || len(rec.summary(DestinationChanged)) == 0 {
			return errors.New("good not seen")
		}
		return nil
	})
	if r.Destination("bad") != nil {
		t.Error("undecodable value entered the view")
	}
	if got := rec.summary(DestinationChanged); !slices.Equal(got, []string{"good:t1"}) {
		t.Errorf("changes = %v, want only good", got)
	}
}

func TestWatchNeedsBuckets(t *testing.T) {
	_, js := natstest.Connect(t, natstest.RunJetStream(t))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := Open(ctx, js, slog.New(slog.DiscardHandler)); !errors.Is(err, jetstream.ErrBucketNotFound) {
		t.Fatalf("Watch without buckets: %v, want ErrBucketNotFound", err)
	}
}

func TestHeld(t *testing.T) {
	for _, tc := range []struct {
		state eventv1.State
		held  bool
	}{
		{eventv1.State_STATE_UNSPECIFIED, false},
		{eventv1.State_STATE_HEALTHY, false},
		{eventv1.State_STATE_QUARANTINED, true},
		{eventv1.State_STATE_PROBING, true},
		{eventv1.State_STATE_RECOVERING, false},
		{eventv1.State_STATE_PAUSED, true},
	} {
		t.Run(tc.state.String(), func(t *testing.T) {
			if got := Held(tc.state); got != tc.held {
				t.Errorf("Held(%v) = %v, want %v", tc.state, got, tc.held)
			}
		})
	}
}

func TestStateOfUnspecifiedDecisionIsHealthy(t *testing.T) {
	r := &Registry{decisions: map[string]*eventv1.Decision{"d1": {DestinationId: "d1"}}}
	if s := r.State("d1"); s != eventv1.State_STATE_HEALTHY {
		t.Errorf("State = %v, want HEALTHY", s)
	}
}

func TestEncodeDecodeRoundTrip(t *testing.T) {
	now := timestamppb.New(time.Unix(1700000000, 123000000))
	for _, tc := range []struct {
		name string
		in   proto.Message
		out  proto.Message
	}{
		{"destination", &adminv1.Destination{
			Id: "d1", TenantId: "t1", Url: "https://example.com/hook", Secret: "whsec_abc=", Enabled: true,
			Filter:              &adminv1.Filter{Splits: []string{"a", "b"}, EnvironmentIds: []string{"e"}},
			MaxBatchImpressions: 500, MaxBatchBytes: 1 << 20, Linger: durationpb.New(200 * time.Millisecond),
			Timeout: durationpb.New(10 * time.Second), Gzip: true, SuccessCodes: []int32{200},
			PreviousSecret: "whsec_old=", PreviousSecretExpires: now, Created: now, Updated: now,
		}, &adminv1.Destination{}},
		{"decision", &eventv1.Decision{
			DestinationId: "d1", TenantId: "t1", State: eventv1.State_STATE_QUARANTINED, Reason: "5 timeouts",
			Since: now, NextProbe: now, DecidedBy: "policy", Revision: 7, ProbeFailures: 2, Domain: "10.0.0.0/24",
		}, &eventv1.Decision{}},
		{"audit record", &eventv1.AuditRecord{
			At: now, Actor: "ops", Action: "PauseTenant", TenantId: "t1", DestinationIds: []string{"d1", "d2"}, DryRun: true,
		}, &eventv1.AuditRecord{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := Encode(tc.in)
			if err != nil {
				t.Fatal(err)
			}
			if err := Decode(b, tc.out); err != nil {
				t.Fatalf("Decode(%s): %v", b, err)
			}
			if !proto.Equal(tc.in, tc.out) {
				t.Errorf("round trip: got %v, want %v", tc.out, tc.in)
			}
		})
	}

	t.Run("proto names and unknown fields", func(t *testing.T) {
		b, err := Encode(&eventv1.Decision{DestinationId: "d1"})
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Contains([]string{`{"destination_id":"d1"}`, `{"destination_id": "d1"}`}, string(b)) {
			t.Errorf("Encode = %s, want proto field names", b)
		}
		var d eventv1.Decision
		if err := Decode([]byte(`{"destination_id":"d1","added_later":true}`), &d); err != nil {
			t.Fatalf("Decode with an unknown field: %v", err)
		}
		if d.GetDestinationId() != "d1" {
			t.Errorf("decoded %v", &d)
		}
	})
}

func TestPutDecision(t *testing.T) {
	_, _, kv := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	dec := func(st eventv1.State) *eventv1.Decision {
		return &eventv1.Decision{DestinationId: "d1", TenantId: "t1", State: st}
	}
	stored := func() eventv1.State {
		t.Helper()
		e, err := kv.Get(ctx, "d1")
		if err != nil {
			t.Fatal(err)
		}
		var d eventv1.Decision
		if err := Decode(e.Value(), &d); err != nil {
			t.Fatal(err)
		}
		return d.GetState()
	}

	rev1, err := PutDecision(ctx, kv, dec(eventv1.State_STATE_QUARANTINED), 0)
	if err != nil || rev1 == 0 {
		t.Fatalf("create: rev %d, %v", rev1, err)
	}
	if _, err := PutDecision(ctx, kv, dec(eventv1.State_STATE_PAUSED), 0); !errors.Is(err, ErrConflict) {
		t.Fatalf("create over an existing key: %v, want ErrConflict", err)
	}
	rev2, err := PutDecision(ctx, kv, dec(eventv1.State_STATE_PROBING), rev1)
	if err != nil || rev2 <= rev1 {
		t.Fatalf("update at rev %d: rev %d, %v", rev1, rev2, err)
	}
	if _, err := PutDecision(ctx, kv, dec(eventv1.State_STATE_PAUSED), rev1); !errors.Is(err, ErrConflict) {
		t.Fatalf("update with stale rev: %v, want ErrConflict", err)
	}
	if got := stored(); got != eventv1.State_STATE_PROBING {
		t.Errorf("stored state = %v, want PROBING (conflicting writes must not land)", got)
	}
	bad := &eventv1.Decision{DestinationId: "a.b", State: eventv1.State_STATE_PAUSED}
	if _, err := PutDecision(ctx, kv, bad, 0); !errors.Is(err, topology.ErrInvalidID) {
		t.Errorf("invalid id: %v, want ErrInvalidID", err)
	}
}

// TestWatchThatEndsIsStartedAgain deletes and re-creates the quarantine
// bucket under a running registry, which ends nats.go's watch for good. The
// registry must watch again and resynchronise: a decision written after the
// re-creation is seen, and one that vanished with the old bucket is gone.
func TestWatchThatEndsIsStartedAgain(t *testing.T) {
	js, _, decs := setup(t)
	putDecision(t, decs, "old", eventv1.State_STATE_QUARANTINED)
	r := openView(t, js, nil)
	if r.State("old") != eventv1.State_STATE_QUARANTINED {
		t.Fatal("initial decision not loaded")
	}
	if age := r.ViewAge(DecisionChanged); age > freshnessInterval {
		t.Fatalf("view age %v right after loading", age)
	}
	ctx := context.Background()
	if err := js.DeleteKeyValue(ctx, topology.BucketQuarantine); err != nil {
		t.Fatal(err)
	}
	if err := stream.Ensure(ctx, js, stream.Limits{}); err != nil {
		t.Fatal(err)
	}
	fresh, err := js.KeyValue(ctx, topology.BucketQuarantine)
	if err != nil {
		t.Fatal(err)
	}
	poll.CheckFor(t, 30*time.Second, 100*time.Millisecond, func() error {
		// Written until seen: the first puts may land before the new watch.
		putDecision(t, fresh, "new", eventv1.State_STATE_PAUSED)
		if r.State("new") != eventv1.State_STATE_PAUSED {
			return errors.New("decision in the re-created bucket not seen")
		}
		if r.Decision("old") != nil {
			return errors.New("decision of the deleted bucket still in the view")
		}
		return nil
	})
	r.checkFresh(ctx)
	if age := r.ViewAge(DecisionChanged); age > time.Second {
		t.Fatalf("view age %v after the watch caught up", age)
	}
}

// TestUpdateDestinationIsCompareAndSet: the one read-modify-write of
// destination records refuses to overwrite a change made in between, and
// leaves a record alone when the change says so.
func TestUpdateDestinationIsCompareAndSet(t *testing.T) {
	_, dests, _ := setup(t)
	ctx := context.Background()
	if err := CreateDestination(ctx, dests, &adminv1.Destination{Id: "d1", TenantId: "t1", Enabled: true}); err != nil {
		t.Fatal(err)
	}
	if err := CreateDestination(ctx, dests, &adminv1.Destination{Id: "d1", TenantId: "t2"}); !errors.Is(err, ErrDestinationExists) {
		t.Fatalf("second create: %v, want ErrDestinationExists", err)
	}
	_, err := UpdateDestination(ctx, dests, "d1", func(d *adminv1.Destination) (bool, error) {
		putDest(t, dests, "d1", "t1") // someone else writes in between
		d.Enabled = false
		return true, nil
	})
	if !errors.Is(err, ErrConflict) {
		t.Fatalf("update over a concurrent write: %v, want ErrConflict", err)
	}
	d, err := UpdateDestination(ctx, dests, "d1", func(d *adminv1.Destination) (bool, error) {
		d.Enabled, d.DisabledReason = false, "410 Gone"
		return true, nil
	})
	if err != nil || d.GetEnabled() || d.GetDisabledReason() != "410 Gone" {
		t.Fatalf("update: %v %v", d, err)
	}
	if _, err := UpdateDestination(ctx, dests, "nope", func(*adminv1.Destination) (bool, error) { return true, nil }); !errors.Is(err, ErrDestinationNotFound) {
		t.Fatalf("update of an unknown id: %v", err)
	}
}
