// Package bench keeps the noisy-neighbor benchmark's behaviour honest in CI:
// the benchmark's scenario code, at a small size, against the whole stack
// in-process.
package bench

import (
	"context"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/e2e/internal/fleet"
	"github.com/bulkhead-io/bulkhead/e2e/internal/report"
	"github.com/bulkhead-io/bulkhead/e2e/internal/scenario"
	"github.com/bulkhead-io/bulkhead/e2e/internal/stack"
	"github.com/bulkhead-io/bulkhead/pkg/leaktest"
)

func TestMain(m *testing.M) { leaktest.VerifyTestMain(m) }

// TestNoisyNeighborIsolation runs the benchmark scenario at a small size:
// 12 destinations, 3 of them failing (hang, refused, 503) for 20 s, about
// 1,000 impressions/s. Every accepted impression must be delivered or
// parked, the hanging and refusing destinations must be quarantined, and
// healthy destinations must keep a sane p99 during the outage.
func TestNoisyNeighborIsolation(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end scenario")
	}
	cfg := scenario.Default()
	cfg.Destinations, cfg.FailingShare, cfg.Rate = 12, 0.25, 1000
	cfg.Warmup, cfg.Steady, cfg.Outage, cfg.Recovery, cfg.DrainMax = 3*time.Second, 7*time.Second, 20*time.Second, 10*time.Second, 90*time.Second
	cfg.Senders = 8

	keys := scenario.KeyPairs(cfg.Destinations)
	s, err := stack.Start(stack.Options{StoreDir: t.TempDir(), APIKeys: keys, Log: stack.TestLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	bh, err := scenario.NewBulkhead(s.IngestAddr, s.AdminAddrs[0], stack.AdminToken, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = bh.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := bh.Ready(ctx); err != nil {
		t.Fatal(err)
	}

	rec := report.NewRecorder(0)
	out, err := scenario.Run(ctx, cfg, scenario.Options{System: "bulkhead", Target: bh, Outage: true, Recorder: rec, ExportAtHeal: true})
	if err != nil {
		t.Fatal(err)
	}
	r := out.Result
	t.Logf("accepted %d delivered %d parked %d lost %d duplicates %d refused %d; quarantined %v; drained %v",
		r.Accepted, r.Delivered, r.Parked, r.Lost, r.Duplicates, out.Refused, out.Quarantined, out.Drained)

	if r.Accepted == 0 || r.Lost != 0 {
		t.Errorf("accepted %d, lost %d: want accepted > 0 and nothing lost (invariant 1)", r.Accepted, r.Lost)
	}
	if out.BadKeys != 0 {
		t.Errorf("%d arrivals with keys the run never submitted", out.BadKeys)
	}
	if out.HealthyQuarantined != 0 {
		t.Errorf("%d healthy destinations quarantined", out.HealthyQuarantined)
	}
	for i, b := range cfg.Failing() {
		if b != fleet.Hang && b != fleet.Refused {
			continue
		}
		d, ok := out.Quarantined[i]
		if !ok {
			t.Errorf("destination %d (%s) never quarantined", i, b)
			continue
		}
		// The policy promises ~10 s; a loaded CI box under -race gets slack.
		if d > 30*time.Second {
			t.Errorf("destination %d (%s) quarantined %v after onset", i, b, d)
		}
	}
	h := rec.Histogram("bulkhead", scenario.PhaseOutage, report.Healthy)
	if h.Count() == 0 {
		t.Fatal("no healthy deliveries during the outage")
	}
	// Generous: a shared-queue design is tens of seconds here; Bulkhead's
	// healthy destinations stay around linger + a few ms.
	if p99 := h.Quantile(0.99); p99 > 3*time.Second {
		t.Errorf("healthy p99 during the outage %v, want < 3s", p99)
	}
}
