package deliver

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/bulkhead-io/bulkhead/pkg/natstest"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

// resumeWithin is how soon delivery must resume after each fault. Repairs
// take two missed heartbeats (4 s) or two starving checks; the rest is
// headroom for a loaded 2-core CI box.
const resumeWithin = 30 * time.Second

// TestNoLaneStarves runs a deliverer on a 3-node cluster with R3 streams and
// breaks its pulls the ways a cluster does: consumer leaders stepping down
// (their waiting pull requests are gone), a full cluster restart, and
// destinations created one after another while others receive. After each,
// every destination must receive what is published next, within seconds.
func TestNoLaneStarves(t *testing.T) {
	if testing.Short() {
		t.Skip("cluster test")
	}
	c := natstest.RunCluster(t, 3)
	nc, js := natstest.ConnectCluster(t, c)
	cfg := testConfig()
	cfg.LagInterval = time.Second
	e := startOn(t, cfg, js, stream.Limits{Replicas: 3})
	s := newSink(t, always(200))

	var dests []string
	addDest := func() string {
		id := fmt.Sprintf("s%d", len(dests))
		e.destination(id, s.srv.URL, 2*time.Second)
		dests = append(dests, id)
		return id
	}
	// sent counts what was published per destination; delivered is checked
	// against it, so a lane that stops receiving fails the wait.
	sent := 0
	resumes := func(fault string) {
		t.Helper()
		for _, id := range dests {
			sent += len(e.publish(id, 2))
		}
		start := time.Now()
		poll.CheckFor(t, resumeWithin, 100*time.Millisecond, func() error {
			if got := s.received(); got < sent {
				return fmt.Errorf("after %s: %d of %d impressions delivered; starving: %v", fault, got, sent, e.undelivered(dests))
			}
			return nil
		})
		t.Logf("%s: delivery resumed in %v", fault, time.Since(start).Round(100*time.Millisecond))
	}

	for range 4 {
		addDest()
	}
	resumes("start")

	for round := range 3 {
		for _, id := range dests {
			name, _ := topology.DeliverConsumer(id)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if err := natstest.StepDownConsumer(ctx, nc, topology.StreamDelivery, name); err != nil {
				t.Logf("round %d: %v", round, err) // no leader at the moment: a fault of its own
			}
			cancel()
		}
		resumes(fmt.Sprintf("consumer leaders stepped down (round %d)", round))
	}

	c.Restart()
	resumes("full cluster restart")

	// Destinations created one after another while the others receive.
	for i := range 6 {
		addDest()
		resumes(fmt.Sprintf("destination %d created under load", i))
	}
}

// undelivered lists the destinations with messages still in DELIVERY.
func (e *env) undelivered(dests []string) map[string]int {
	out := map[string]int{}
	st, err := e.js.Stream(context.Background(), topology.StreamDelivery)
	if err != nil {
		return out
	}
	info, err := st.Info(context.Background(), jetstream.WithSubjectFilter(topology.AllDeliver))
	if err != nil {
		return out
	}
	for _, id := range dests {
		subj, _ := topology.Deliver(id)
		if n := info.State.Subjects[subj]; n > 0 {
			out[id] = int(n)
		}
	}
	return out
}

// TestLaneWhoseConsumerIsDeletedServesAgain deletes a lane's durable
// consumer under it (an operator's `nats consumer rm`, the loss of an R1
// node). The lane must create the consumer again and deliver what follows.
func TestLaneWhoseConsumerIsDeletedServesAgain(t *testing.T) {
	e := start(t, testConfig())
	s := newSink(t, always(200))
	e.destination("d1", s.srv.URL, 2*time.Second)
	first := e.publish("d1", 2)
	poll.CheckFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		if got := s.received(); got != len(first) {
			return fmt.Errorf("received %d of %d", got, len(first))
		}
		return nil
	})
	name, _ := topology.DeliverConsumer("d1")
	if err := e.js.DeleteConsumer(context.Background(), topology.StreamDelivery, name); err != nil {
		t.Fatal(err)
	}
	more := e.publish("d1", 2)
	poll.CheckFor(t, 30*time.Second, 50*time.Millisecond, func() error {
		if got, want := s.received(), len(first)+len(more); got != want {
			return fmt.Errorf("received %d of %d after the consumer was deleted", got, want)
		}
		return nil
	})
}

// TestBacklogOfADeletedDestinationIsParked leaves batches in DELIVERY for a
// destination that does not exist (deleted while no deliverer ran). The
// deliverer must park them as "destination deleted", where export finds
// them, and remove the consumer, instead of stranding them (F6).
func TestBacklogOfADeletedDestinationIsParked(t *testing.T) {
	cfg := testConfig()
	cfg.OrphanInterval = 200 * time.Millisecond
	e := start(t, cfg)
	s := newSink(t, always(200))
	e.destination("live", s.srv.URL, 2*time.Second)
	live := e.publish("live", 2)
	gone := e.publish("gone", 3)
	poll.CheckFor(t, 30*time.Second, 50*time.Millisecond, func() error {
		if n := e.inDelivery("gone"); n != 0 {
			return fmt.Errorf("%d batches of the deleted destination still in DELIVERY", n)
		}
		if n, _ := e.parkedReasons("gone"); n != len(gone) {
			return fmt.Errorf("%d of %d impressions parked", n, len(gone))
		}
		return nil
	})
	if _, reasons := e.parkedReasons("gone"); reasons[0] != "destination deleted" {
		t.Errorf("parked as %q, want destination deleted", reasons[0])
	}
	// The live destination is untouched: delivered, nothing parked.
	poll.CheckFor(t, 20*time.Second, 50*time.Millisecond, func() error {
		if got := s.received(); got != len(live) {
			return fmt.Errorf("live received %d of %d", got, len(live))
		}
		return nil
	})
	if n, _ := e.parkedReasons("live"); n != 0 {
		t.Errorf("the live destination had %d impressions parked", n)
	}
	name, _ := topology.DeliverConsumer("gone")
	poll.CheckFor(t, 20*time.Second, 100*time.Millisecond, func() error {
		if _, err := e.js.Consumer(context.Background(), topology.StreamDelivery, name); err == nil {
			return fmt.Errorf("consumer %s still exists", name)
		}
		return nil
	})
}
