package health

import (
	"errors"
	"math"
	"testing"
	"time"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
)

func newTestWindow(t *testing.T) *Window {
	t.Helper()
	w, err := NewWindow(30*time.Second, time.Second, 0.8)
	if err != nil {
		t.Fatalf("NewWindow: %v", err)
	}
	return w
}

func TestNewWindowRejectsBadShapes(t *testing.T) {
	tests := []struct {
		name         string
		span, bucket time.Duration
		slow         float64
	}{
		{"zero bucket", 30 * time.Second, 0, 0.8},
		{"zero span", 0, time.Second, 0.8},
		{"span not a multiple", 30 * time.Second, 7 * time.Second, 0.8},
		{"too many buckets", time.Hour + time.Second, time.Second / 2, 0.8},
		{"slow fraction zero", 30 * time.Second, time.Second, 0},
		{"slow fraction above one", 30 * time.Second, time.Second, 1.5},
		{"slow fraction NaN", 30 * time.Second, time.Second, math.NaN()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := NewWindow(tt.span, tt.bucket, tt.slow); !errors.Is(err, ErrInvalidPolicy) {
				t.Fatalf("NewWindow = %v, want ErrInvalidPolicy", err)
			}
		})
	}
}

func TestWindowCountsSlideAndExpire(t *testing.T) {
	w := newTestWindow(t)
	start := epoch()
	// One attempt per second for 60s: successes, then a 5xx every 10th.
	for i := range 60 {
		class := ok
		if i%10 == 9 {
			class = server
		}
		w.Add(outcome("d", class, start.Add(time.Duration(i)*time.Second)), start.Add(time.Duration(i)*time.Second))
	}
	now := start.Add(59 * time.Second)
	c := w.Counts(now)
	if c.Attempts != 30 || c.Failures != 3 || c.Successes != 27 {
		t.Fatalf("Counts = %+v, want 30 attempts, 3 failures, 27 successes", c)
	}
	if got := w.Recent(now, 10*time.Second); got.Attempts != 10 {
		t.Fatalf("Recent(10s).Attempts = %d, want 10", got.Attempts)
	}
	if got := w.Counts(now.Add(15 * time.Second)); got.Attempts != 15 {
		t.Fatalf("Counts 15s later = %d attempts, want 15", got.Attempts)
	}
	if got := w.Counts(now.Add(31 * time.Second)); got.Attempts != 0 {
		t.Fatalf("Counts 31s later = %d attempts, want 0", got.Attempts)
	}
	if got := w.LastSuccess(); !got.Equal(start.Add(58 * time.Second)) {
		t.Fatalf("LastSuccess = %v, want 58s after start", got)
	}
}

func TestWindowDropsOutcomesOlderThanSpan(t *testing.T) {
	w := newTestWindow(t)
	now := epoch()
	w.Add(outcome("d", ok, now), now)
	w.Add(outcome("d", server, now.Add(-31*time.Second)), now.Add(-31*time.Second))
	w.Add(outcome("d", server, now.Add(-5*time.Second)), now.Add(-5*time.Second))
	if c := w.Counts(now); c.Attempts != 2 || c.Failures != 1 {
		t.Fatalf("Counts = %+v, want 2 attempts and 1 failure", c)
	}
}

func TestWindowConsecutiveRuns(t *testing.T) {
	tests := []struct {
		name    string
		classes []eventv1.ErrorClass
		gap     time.Duration // before the last outcome
		want    int
	}{
		{"failures count", []eventv1.ErrorClass{server, timeout, refused}, time.Second, 3},
		{"success resets", []eventv1.ErrorClass{server, server, ok, server}, time.Second, 1},
		{"429 neither extends nor breaks", []eventv1.ErrorClass{server, throttled, server}, time.Second, 2},
		{"4xx neither extends nor breaks", []eventv1.ErrorClass{server, client, server}, time.Second, 2},
		{"silence longer than span breaks", []eventv1.ErrorClass{server, server, server}, 31 * time.Second, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newTestWindow(t)
			at := epoch()
			for i, c := range tt.classes {
				if i == len(tt.classes)-1 {
					at = at.Add(tt.gap)
				} else {
					at = at.Add(time.Second)
				}
				w.Add(outcome("d", c, at), at)
			}
			if got := w.Consecutive(at); got != tt.want {
				t.Fatalf("Consecutive = %d, want %d", got, tt.want)
			}
		})
	}
}

func TestWindowConsecutiveExpiresWithoutNewOutcomes(t *testing.T) {
	w := newTestWindow(t)
	at := epoch()
	for range 4 {
		at = at.Add(time.Second)
		w.Add(outcome("d", server, at), at)
	}
	if got := w.Consecutive(at.Add(30 * time.Second)); got != 4 {
		t.Fatalf("Consecutive 30s later = %d, want 4", got)
	}
	if got := w.Consecutive(at.Add(31 * time.Second)); got != 0 {
		t.Fatalf("Consecutive 31s later = %d, want 0", got)
	}
}

func TestWindowLatencyQuantiles(t *testing.T) {
	w := newTestWindow(t)
	now := epoch()
	for i := range 1000 {
		o := outcome("d", ok, now)
		o.LatencyMs = 100
		if i%100 < 2 {
			o.LatencyMs = 5000
		}
		w.Add(o, now.Add(-time.Duration(i%30)*time.Second))
	}
	within := func(got, want float64) bool { return math.Abs(got-want) <= 0.125*want }
	if p50 := w.Latency(now, 0.5); !within(p50, 100) {
		t.Errorf("p50 = %v, want 100 ± 12.5%%", p50)
	}
	if p99 := w.Latency(now, 0.99); !within(p99, 5000) {
		t.Errorf("p99 = %v, want 5000 ± 12.5%%", p99)
	}
	if got := w.Latency(now.Add(time.Hour), 0.5); got != 0 {
		t.Errorf("p50 an hour later = %v, want 0", got)
	}
}

func TestLatencyBinsWithinTolerance(t *testing.T) {
	for v := 1.0; v < 131_000; v *= 1.01 {
		got := binValue(latencyBin(v))
		if math.Abs(got-v) > 0.125*v {
			t.Fatalf("binValue(latencyBin(%v)) = %v, off by more than 12.5%%", v, got)
		}
	}
	if got := latencyBin(0.3); got != 0 {
		t.Fatalf("latencyBin(0.3) = %d, want 0", got)
	}
	if got := latencyBin(1e9); got != latencyBins-1 {
		t.Fatalf("latencyBin(1e9) = %d, want the overflow bin", got)
	}
}

func TestWindowCountsSlowAttempts(t *testing.T) {
	w := newTestWindow(t)
	now := epoch()
	for _, lat := range []float64{2000, 7999, 8000, 9500} {
		o := outcome("d", ok, now)
		o.LatencyMs = lat
		w.Add(o, now)
	}
	if got := w.Counts(now).Slow; got != 2 {
		t.Fatalf("Slow = %d, want 2 (latency >= 80%% of 10s)", got)
	}
}
