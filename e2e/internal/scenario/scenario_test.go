package scenario

import (
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/e2e/internal/fleet"
	"github.com/bulkhead-io/bulkhead/e2e/internal/report"
)

func TestScheduleSpreadsTheRateEvenly(t *testing.T) {
	for _, tc := range []struct {
		dests    int
		rate     float64
		interval time.Duration
	}{
		{200, 20000, time.Second},
		{2000, 20000, 5 * time.Second},
		{12, 1000, time.Second},
		{7, 100, 100 * time.Millisecond},
		{2000, 1000, 100 * time.Millisecond}, // fewer impressions than tenants per tick
	} {
		cfg := Default()
		cfg.Destinations, cfg.Rate, cfg.Interval = tc.dests, tc.rate, tc.interval
		if err := cfg.Validate(); err != nil {
			t.Fatalf("%+v: %v", tc, err)
		}
		total := 0
		perTenant := make([]int, tc.dests)
		for k := range cfg.ticks() {
			tick := 0
			for i := range tc.dests {
				n := cfg.count(i, k)
				if n > cfg.perTenantMax() {
					t.Fatalf("%+v: tenant %d tick %d gets %d > max %d", tc, i, k, n, cfg.perTenantMax())
				}
				tick += n
				perTenant[i] += n
			}
			if tick != cfg.perTick() {
				t.Fatalf("%+v: tick %d carries %d, want %d", tc, k, tick, cfg.perTick())
			}
			total += tick
		}
		want := int(tc.rate * cfg.Load().Seconds())
		if total < want*99/100 || total > want*101/100 {
			t.Errorf("%+v: %d impressions scheduled, want about %d", tc, total, want)
		}
		lo, hi := perTenant[0], perTenant[0]
		for _, n := range perTenant {
			lo, hi = min(lo, n), max(hi, n)
		}
		if hi-lo > cfg.ticks()/10+1 && hi > 0 && float64(hi-lo)/float64(hi) > 0.1 {
			t.Errorf("%+v: tenants get %d..%d impressions: uneven", tc, lo, hi)
		}
	}
}

func TestFailingIsSeededAndMixed(t *testing.T) {
	cfg := Default()
	a, b := cfg.Failing(), cfg.Failing()
	counts := map[fleet.Behavior]int{}
	for i := range a {
		if a[i] != b[i] {
			t.Fatal("same seed, different failing set")
		}
		counts[a[i]]++
	}
	if counts[fleet.Hang] != 20 || counts[fleet.Refused] != 20 || counts[fleet.Status503] != 20 || counts[fleet.Healthy] != 140 {
		t.Fatalf("behaviours %v, want 20 each of hang, refused, 503 and 140 healthy", counts)
	}
	cfg.Seed = 2
	same := true
	for i, bh := range cfg.Failing() {
		same = same && bh == a[i]
	}
	if same {
		t.Fatal("another seed picked the same set")
	}
}

func TestKeysRoundTrip(t *testing.T) {
	cfg := Default()
	tr := newTracker(cfg, "bulkhead", "x1", cfg.Failing(), report.NewRecorder(0))
	for _, c := range [][3]int{{0, 0, 0}, {199, cfg.ticks() - 1, cfg.perTenantMax() - 1}, {17, 42, 3}} {
		i, k, j, ok := tr.parse(tr.key(c[0], c[1], c[2]))
		if !ok || i != c[0] || k != c[1] || j != c[2] {
			t.Fatalf("round trip %v: %d %d %d %v", c, i, k, j, ok)
		}
	}
	for _, bad := range []string{"", "x1", "x1-1-2", "x2-1-2-3", "x1-200-0-0", "x1-1-2-3-4", "x1--1-2-3", "x1-a-2-3"} {
		if _, _, _, ok := tr.parse(bad); ok {
			t.Errorf("parse %q: accepted", bad)
		}
	}
}

func TestTrackerAccounts(t *testing.T) {
	cfg := Default()
	cfg.Destinations, cfg.Rate = 2, 20
	failing := []fleet.Behavior{fleet.Healthy, fleet.Hang}
	rec := report.NewRecorder(0)
	tr := newTracker(cfg, "bulkhead", "p", failing, rec)
	tr.start = time.Now()
	tr.accept(0, 0, 3)
	tr.accept(1, 0, 3)
	tr.arrival(fleet.Arrival{Endpoint: 0, At: tr.start.Add(time.Second), Keys: []string{tr.key(0, 0, 0), tr.key(0, 0, 1), tr.key(0, 0, 1)}})
	tr.arrival(fleet.Arrival{Endpoint: 1, At: tr.start.Add(time.Second), Keys: []string{tr.key(1, 0, 0), tr.key(0, 0, 2)}})
	tr.park(tr.key(1, 0, 1))
	c := tr.count()
	if c.accepted != 6 || c.delivered != 3 || c.parkedOnly != 1 || c.lost != 2 || tr.nDup.Load() != 1 || tr.nBad.Load() != 1 {
		t.Fatalf("counts %+v dup %d bad %d", c, tr.nDup.Load(), tr.nBad.Load())
	}
	if h := rec.Histogram("bulkhead", PhaseWarmup, report.Healthy); h.Count() != 2 {
		t.Fatalf("healthy samples %d, want 2", h.Count())
	}
}
