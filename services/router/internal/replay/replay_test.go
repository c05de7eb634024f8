package replay

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/leaktest"
	"github.com/bulkhead-io/bulkhead/pkg/lifecycle"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/testkit"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

func TestMain(m *testing.M) { leaktest.VerifyTestMain(m) }

type fixture struct {
	*testkit.Env
	js jetstream.JetStream
}

// start runs one replayer against a fresh JetStream.
func start(t *testing.T) *fixture {
	t.Helper()
	env := testkit.JetStream(t, stream.Limits{})
	f := &fixture{Env: env, js: env.JS}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	log := slog.New(slog.DiscardHandler)
	view, err := registry.Open(ctx, f.js, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(view.Stop)
	r, err := New(ctx, f.js, view, Config{Rate: 100, MaxRate: 1000, RampEvery: time.Second, TotalRate: 1000, Holder: "r0"}, log, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	h := lifecycle.Start(context.Background(), r.Run)
	t.Cleanup(func() { _ = h.Stop() })
	return f
}

func (f *fixture) park(t *testing.T, dest string, n int) {
	t.Helper()
	for i := range n {
		b := testkit.Batch(fmt.Sprintf("%s-b%d", dest, i), dest, testkit.Impressions("k", 1))
		if err := parked.Park(context.Background(), f.js, b, parked.Reason{Class: parked.Quarantined}, 1, b.BatchId); err != nil {
			t.Fatal(err)
		}
	}
}

func (f *fixture) inDelivery(t *testing.T, dest string) uint64 {
	t.Helper()
	subj, _ := topology.Deliver(dest)
	st, err := f.js.Stream(context.Background(), topology.StreamDelivery)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(context.Background(), jetstream.WithSubjectFilter(subj))
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Subjects[subj]
}

// TestRecoveringDestinationIsReplayed parks batches, then decides
// RECOVERING: the replayer moves them all to DELIVERY and releases the
// replay lease.
func TestRecoveringDestinationIsReplayed(t *testing.T) {
	f := start(t)
	f.Put(t, testkit.Destination("d"))
	f.park(t, "d", 5)
	f.Decide(t, "d", eventv1.State_STATE_RECOVERING, 1)
	poll.CheckFor(t, 30*time.Second, 50*time.Millisecond, func() error {
		n, _, err := parked.Stats(context.Background(), f.js, "d")
		if err != nil {
			return err
		}
		if got := f.inDelivery(t, "d"); n != 0 || got != 5 {
			return fmt.Errorf("parked %d, in DELIVERY %d; want 0 and 5", n, got)
		}
		return nil
	})
	key, _ := topology.LeaseReplay("d")
	poll.CheckFor(t, 10*time.Second, 50*time.Millisecond, func() error {
		if _, err := f.Leases.Get(context.Background(), key); err == nil {
			return fmt.Errorf("replay lease %s still held after the replay", key)
		}
		return nil
	})
}

// TestDeletedDestinationIsNotReplayed: a destination deleted while
// RECOVERING keeps its parked data (it stays exportable) instead of
// moving it into DELIVERY, where no lane would ever take it.
func TestDeletedDestinationIsNotReplayed(t *testing.T) {
	f := start(t)
	f.Put(t, testkit.Destination("gone"))
	f.park(t, "gone", 3)
	f.Decide(t, "gone", eventv1.State_STATE_RECOVERING, 1)
	if err := f.Destinations.Delete(context.Background(), "gone"); err != nil {
		t.Fatal(err)
	}
	// Past the grace period and a replay's first batches.
	time.Sleep(parked.ReplayGrace + time.Second)
	n, _, err := parked.Stats(context.Background(), f.js, "gone")
	if err != nil {
		t.Fatal(err)
	}
	if got := f.inDelivery(t, "gone"); n != 3 || got != 0 {
		t.Fatalf("parked %d, in DELIVERY %d; want 3 and 0", n, got)
	}
}
