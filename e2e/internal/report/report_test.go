package report

import (
	"bytes"
	"encoding/json"
	"image/png"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// exact returns the nearest-rank q-quantile of sorted.
func exact(sorted []time.Duration, q float64) time.Duration {
	rank := int(math.Ceil(q * float64(len(sorted))))
	return sorted[min(max(rank, 1), len(sorted))-1]
}

func TestQuantileAccuracy(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	tests := []struct {
		name string
		n    int
		gen  func() time.Duration
	}{
		{"lognormal ms", 100_000, func() time.Duration {
			return time.Duration(math.Exp(rng.NormFloat64()*1.5) * float64(time.Millisecond))
		}},
		{"uniform 0-10s", 50_000, func() time.Duration { return time.Duration(rng.Int64N(int64(10 * time.Second))) }},
		{"small exact", 1000, func() time.Duration { return time.Duration(rng.IntN(128)) }},
		{"bimodal ms and hours", 20_000, func() time.Duration {
			if rng.IntN(10) == 0 {
				return time.Duration(rng.Int64N(int64(12 * time.Hour)))
			}
			return time.Duration(rng.Int64N(int64(5 * time.Millisecond)))
		}},
		{"single", 1, func() time.Duration { return 42 * time.Millisecond }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var h Histogram
			vals := make([]time.Duration, tc.n)
			for i := range vals {
				vals[i] = tc.gen()
				h.Record(vals[i])
			}
			slices.Sort(vals)
			for _, q := range []float64{0, 0.001, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1} {
				want, got := exact(vals, q), h.Quantile(q)
				if err := math.Abs(float64(got-want)) / max(float64(want), 1); err > 0.01 {
					t.Errorf("q%.3f = %v, exact %v: error %.2f%% > 1%%", q, got, want, 100*err)
				}
			}
			if h.Count() != uint64(tc.n) || h.Min() != vals[0] || h.Max() != vals[len(vals)-1] {
				t.Errorf("count %d min %v max %v, want %d %v %v", h.Count(), h.Min(), h.Max(), tc.n, vals[0], vals[len(vals)-1])
			}
		})
	}
}

func TestHistogramMergeAndEdges(t *testing.T) {
	var a, b, all Histogram
	for i := range 1000 {
		d := time.Duration(i) * time.Microsecond
		all.Record(d)
		if i%2 == 0 {
			a.Record(d)
		} else {
			b.Record(d)
		}
	}
	a.Merge(&b)
	a.Merge(nil)
	for _, q := range []float64{0.1, 0.5, 0.99} {
		if a.Quantile(q) != all.Quantile(q) {
			t.Errorf("merged q%.2f = %v, want %v", q, a.Quantile(q), all.Quantile(q))
		}
	}
	if a.Mean() != all.Mean() || a.Count() != 1000 {
		t.Errorf("merged mean %v count %d", a.Mean(), a.Count())
	}
	var empty Histogram
	if empty.Quantile(0.5) != 0 || empty.Mean() != 0 || empty.Latency().Count != 0 {
		t.Error("empty histogram not zero")
	}
	var neg Histogram
	neg.Record(-time.Second)
	neg.Record(math.MaxInt64)
	if neg.Min() != 0 || neg.Max() != math.MaxInt64 {
		t.Errorf("extremes: min %v max %v", neg.Min(), neg.Max())
	}
}

func TestRecorder(t *testing.T) {
	r := NewRecorder(10)
	var wg sync.WaitGroup
	for _, sys := range []string{"bulkhead", "shared-queue"} {
		wg.Go(func() {
			slow := time.Duration(1)
			if sys == "shared-queue" {
				slow = 100
			}
			for sec := range 12 {
				phase, factor := "baseline", time.Duration(1)
				if sec >= 4 {
					phase, factor = "outage", slow
				}
				for range 100 {
					r.Record(Sample{System: sys, Phase: phase, Class: Healthy, Second: sec, Latency: 10 * time.Millisecond * factor})
					r.Record(Sample{System: sys, Phase: phase, Class: Failing, Second: sec, Latency: time.Second})
				}
			}
		})
	}
	wg.Wait()
	if got := r.Phases(); !slices.Equal(got, []string{"baseline", "outage"}) {
		t.Fatalf("phases %v", got)
	}
	if got := r.Dropped(); got != 2*2*2*100 {
		t.Fatalf("dropped %d, want 800 (seconds 10 and 11)", got)
	}
	overall, phases := r.Latencies("shared-queue", "baseline")
	if len(overall) != 2 || overall[0].Count != 1200 || len(phases) != 4 {
		t.Fatalf("overall %+v phases %+v", overall, phases)
	}
	for _, pl := range phases {
		want := 1.0
		if pl.Phase == "outage" && pl.Class == Healthy {
			want = 100
		}
		if math.Abs(pl.P99Ratio-want) > 0.01*want {
			t.Errorf("%s %s p99 ratio %.2f, want %.0f", pl.Phase, pl.Class, pl.P99Ratio, want)
		}
	}
	tl := r.Timeline("bulkhead", Healthy)
	if len(tl) != 10 || tl[9].Count != 100 || math.Abs(tl[9].P99Ms-10) > 0.1 {
		t.Fatalf("timeline %+v", tl)
	}
	if got := r.Timelines(Healthy); len(got) != 2 {
		t.Fatalf("timelines for %d systems", len(got))
	}
}

func TestClassText(t *testing.T) {
	for _, c := range classes {
		b, err := c.MarshalText()
		if err != nil {
			t.Fatal(err)
		}
		var back Class
		if err := back.UnmarshalText(b); err != nil || back != c {
			t.Fatalf("round trip %v: %v %v", c, back, err)
		}
	}
	if _, err := Class(7).MarshalText(); err == nil {
		t.Fatal("unknown class marshalled")
	}
}

// sampleResult builds a Result from a Recorder as the driver would.
func sampleResult(r *Recorder) Result {
	res := Result{
		Title:               "Isolation | 2 systems",
		Started:             time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
		DurationSec:         60,
		Destinations:        100,
		FailingDestinations: 10,
		Params:              map[string]string{"rate": "100000/s", "workers": "16"},
		Phases:              []Phase{{"baseline", 0, 20}, {"outage", 20, 40}, {"recovery", 40, 60}},
		Baseline:            "baseline",
		Notes:               []string{"Shared-queue reference model:\n- one FIFO"},
	}
	for _, name := range r.Systems() {
		s := SystemResult{Name: name, Accepted: 1000, Delivered: 990, Parked: 10, CPUSeconds: 12.5, PeakRSSBytes: 300 << 20}
		s.Overall, s.Phases = r.Latencies(name, res.Baseline)
		if name == "bulkhead" {
			s.Failing = &FailingResult{
				Destinations:      10,
				OnsetToQuarantine: NewSpread([]time.Duration{2 * time.Second, 3 * time.Second, 9 * time.Second}),
				Parked:            10,
				HealToDrained:     NewSpread([]time.Duration{4 * time.Second}),
			}
		}
		res.Systems = append(res.Systems, s)
	}
	return res
}

func recorded() *Recorder {
	r := NewRecorder(0)
	for _, sys := range []string{"bulkhead", "shared-queue"} {
		for sec := range 60 {
			phase := []string{"baseline", "outage", "recovery"}[sec/20]
			lat := 5 * time.Millisecond
			if sys == "shared-queue" && phase != "baseline" {
				lat = time.Duration(sec-19) * time.Second
			}
			if sec == 30 {
				continue // a second without deliveries breaks the line
			}
			r.Record(Sample{System: sys, Phase: phase, Class: Healthy, Second: sec, Latency: lat})
			r.Record(Sample{System: sys, Phase: phase, Class: Failing, Second: sec, Latency: 2 * lat})
		}
	}
	return r
}

func TestWriteMarkdown(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteMarkdown(&buf, sampleResult(recorded())); err != nil {
		t.Fatal(err)
	}
	md := buf.String()
	for _, want := range []string{
		"# Isolation \\| 2 systems", "| bulkhead |", "| shared-queue |", "## Healthy destinations",
		"## Failing destinations: handling", "baseline (baseline)", "| rate | 100000/s |", "300 MiB",
		"| shared-queue | — |", "3 / 10", "one FIFO",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q", want)
		}
	}
	if t.Failed() {
		t.Log(md)
	}
}

func TestWriteJSON(t *testing.T) {
	path := filepath.Join(t.TempDir(), "result.json")
	want := sampleResult(recorded())
	if err := WriteJSON(path, want); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var got Result
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("decode: %v", err)
	}
	if len(got.Systems) != 2 || got.Systems[0].Failing == nil || got.Systems[1].Phases[2].Class != Healthy || got.Systems[1].Phases[2].Phase != "outage" ||
		got.Systems[1].Phases[2].P99Ratio != want.Systems[1].Phases[2].P99Ratio {
		t.Fatalf("round trip: %+v", got)
	}
	if !bytes.Contains(b, []byte(`"class": "failing"`)) {
		t.Fatal("class not encoded by name")
	}
	if err := WriteJSON(filepath.Join(t.TempDir(), "no", "such", "dir.json"), want); err == nil {
		t.Fatal("WriteJSON into a missing directory succeeded")
	}
}

func TestWriteChart(t *testing.T) {
	tests := []struct {
		name      string
		timelines map[string][]Point
	}{
		{"two systems", recorded().Timelines(Healthy)},
		{"no data", map[string][]Point{"bulkhead": nil}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "latency.png")
			if err := WriteChart(path, tc.timelines, 20*time.Second, 40*time.Second); err != nil {
				t.Fatal(err)
			}
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			img, err := png.Decode(f)
			if err != nil {
				t.Fatalf("decode png: %v", err)
			}
			if b := img.Bounds(); b.Dx() == 0 || b.Dy() == 0 {
				t.Fatalf("image bounds %v", b)
			}
		})
	}
}

func BenchmarkRecord(b *testing.B) {
	r := NewRecorder(0)
	i := 0
	for b.Loop() {
		i++
		r.Record(Sample{System: "bulkhead", Phase: "outage", Class: Healthy, Second: i % 600, Latency: time.Duration(i)})
	}
}
