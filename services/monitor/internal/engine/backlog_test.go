package engine

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus/testutil"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

// TestUnmovingBacklogIsReportedStalledNotQuarantined leaves one
// destination's batches in DELIVERY with nobody delivering them, while a
// second destination's backlog moves (attempts keep arriving). Every
// replica must report the first stalled, the second not; neither may be
// quarantined (a stall is Bulkhead's fault, not the endpoint's); and the
// stall must end once the backlog is gone.
func TestUnmovingBacklogIsReportedStalledNotQuarantined(t *testing.T) {
	e, _ := startEnginesWith(t, 2, func(c *Config) {
		c.StallAfter, c.BacklogInterval = 2*time.Second, 100*time.Millisecond
	})
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	t.Cleanup(srv.Close)
	e.destination("stuck", srv.URL)
	e.destination("moving", srv.URL)
	for _, id := range []string{"stuck", "moving"} {
		subj, _ := topology.Deliver(id)
		for i := range 3 {
			if _, err := e.js.Publish(context.Background(), subj, fmt.Appendf(nil, "batch %d", i)); err != nil {
				t.Fatal(err)
			}
		}
	}
	// "moving" gets an attempt every 200 ms; "stuck" none.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	attempts := make(chan struct{})
	go func() {
		defer close(attempts)
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				e.outcome("moving", eventv1.ErrorClass_ERROR_CLASS_UNSPECIFIED)
			}
		}
	}()

	poll.CheckFor(t, 30*time.Second, 100*time.Millisecond, func() error {
		for i, eng := range e.engines {
			if h := eng.Stats("stuck"); h.GetStalledSince() == nil {
				return fmt.Errorf("replica %d: stuck not reported stalled", i)
			}
		}
		return nil
	})
	for i, eng := range e.engines {
		if h := eng.Stats("moving"); h.GetStalledSince() != nil {
			t.Errorf("replica %d: moving reported stalled since %v although attempts keep arriving", i, h.GetStalledSince().AsTime())
		}
	}
	if got := e.state("stuck"); got != eventv1.State_STATE_HEALTHY {
		t.Errorf("stuck is %v: a stall must not quarantine", got)
	}

	// The backlog goes (delivered, say): the stall ends.
	st, err := e.js.Stream(context.Background(), topology.StreamDelivery)
	if err != nil {
		t.Fatal(err)
	}
	subj, _ := topology.Deliver("stuck")
	if err := st.Purge(context.Background(), jetstream.WithPurgeSubject(subj)); err != nil {
		t.Fatal(err)
	}
	poll.CheckFor(t, 30*time.Second, 100*time.Millisecond, func() error {
		for i, eng := range e.engines {
			if h := eng.Stats("stuck"); h.GetStalledSince() != nil {
				return fmt.Errorf("replica %d: stuck still stalled after its backlog went", i)
			}
		}
		return nil
	})
	cancel()
	<-attempts
}

// TestParkedAgeIsExported: each destination with parked data has a gauge of
// its oldest parked batch's age (so data nearing the export window is seen
// before JetStream deletes it), and the gauge goes when the data does.
func TestParkedAgeIsExported(t *testing.T) {
	e, _ := startEnginesWith(t, 1, func(c *Config) { c.ParkedInterval = time.Hour }) // driven by hand below
	eng := e.engines[0]
	b := &eventv1.Batch{BatchId: "b1", TenantId: "t1", DestinationId: "d1",
		Impressions: []*ingestv1.Impression{{Key: "k", Split: "s", Treatment: "on", Time: 1}}}
	if err := parked.Park(context.Background(), e.js, b, parked.Reason{Class: parked.Quarantined}, 0, "b1.d1"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // an age above zero
	eng.watchParked(context.Background())
	if age := testutil.ToFloat64(eng.metrics.parkedAge.WithLabelValues("d1")); age <= 0 || age > 60 {
		t.Fatalf("parked age of d1 = %v s", age)
	}
	if n := testutil.ToFloat64(eng.metrics.parkedBatches); n != 1 {
		t.Fatalf("parked batches = %v, want 1", n)
	}
	if _, err := parked.Purge(context.Background(), e.js, "d1", parked.Range{}, false); err != nil {
		t.Fatal(err)
	}
	eng.watchParked(context.Background())
	if n := testutil.CollectAndCount(eng.metrics.parkedAge); n != 0 {
		t.Fatalf("%d parked-age series left after the data went", n)
	}
}
