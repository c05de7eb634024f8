package report

import (
	"fmt"
	"slices"
	"sync"
	"time"
)

// Class says whether a sample's destination was one the scenario makes fail.
type Class int8

// The destination classes.
const (
	// Healthy destinations never fail in the scenario; their latency must
	// not depend on the failing ones (invariant 2).
	Healthy Class = iota
	// Failing destinations are the ones the scenario's outage hits.
	Failing
)

// String returns "healthy" or "failing".
func (c Class) String() string {
	switch c {
	case Healthy:
		return "healthy"
	case Failing:
		return "failing"
	}
	return fmt.Sprintf("class(%d)", int8(c))
}

// MarshalText encodes the class as its name.
func (c Class) MarshalText() ([]byte, error) {
	if c != Healthy && c != Failing {
		return nil, fmt.Errorf("marshal class %d: unknown", int8(c))
	}
	return []byte(c.String()), nil
}

// UnmarshalText decodes a class name.
func (c *Class) UnmarshalText(b []byte) error {
	switch string(b) {
	case "healthy":
		*c = Healthy
	case "failing":
		*c = Failing
	default:
		return fmt.Errorf("unmarshal class %q: unknown", b)
	}
	return nil
}

var classes = [...]Class{Healthy, Failing}

// Sample is one delivered impression's end-to-end latency.
type Sample struct {
	// System is the system under test ("bulkhead", "shared-queue").
	System string
	// Phase is the scenario phase the sample belongs to ("baseline",
	// "outage", "recovery"): by convention the phase it was submitted in.
	Phase string
	// Class is its destination's class.
	Class Class
	// Second is the second since the run's start the sample belongs to in
	// the timeline, by convention its submit second, so impressions stuck
	// during an outage show up where they were submitted. Negative counts
	// as 0.
	Second int
	// Latency is from submit to the destination's 2xx.
	Latency time.Duration
}

// DefaultMaxSeconds bounds a Recorder's timeline when NewRecorder is given 0.
const DefaultMaxSeconds = 3600

// Recorder aggregates samples per system × phase × class and, for the
// timeline, per system × class × second. Memory is bounded: one Histogram
// (a few KiB) per combination, and at most maxSeconds seconds of timeline;
// later seconds are counted in Dropped but still reach the phase
// histograms. It is safe for concurrent use.
type Recorder struct {
	maxSeconds int

	mu       sync.Mutex
	systems  []string // in order of first sample
	phases   []string // in order of first sample
	byPhase  map[phaseKey]*Histogram
	timeline map[timelineKey][]*Histogram
	dropped  int64
}

type phaseKey struct {
	system, phase string
	class         Class
}

type timelineKey struct {
	system string
	class  Class
}

// NewRecorder returns an empty Recorder keeping at most maxSeconds seconds
// of timeline (DefaultMaxSeconds when maxSeconds <= 0).
func NewRecorder(maxSeconds int) *Recorder {
	if maxSeconds <= 0 {
		maxSeconds = DefaultMaxSeconds
	}
	return &Recorder{
		maxSeconds: maxSeconds,
		byPhase:    make(map[phaseKey]*Histogram),
		timeline:   make(map[timelineKey][]*Histogram),
	}
}

// Record adds one sample.
func (r *Recorder) Record(s Sample) {
	r.mu.Lock()
	defer r.mu.Unlock()
	pk := phaseKey{s.System, s.Phase, s.Class}
	h := r.byPhase[pk]
	if h == nil {
		h = new(Histogram)
		r.byPhase[pk] = h
		if !slices.Contains(r.systems, s.System) {
			r.systems = append(r.systems, s.System)
		}
		if !slices.Contains(r.phases, s.Phase) {
			r.phases = append(r.phases, s.Phase)
		}
	}
	h.Record(s.Latency)

	sec := max(s.Second, 0)
	if sec >= r.maxSeconds {
		r.dropped++
		return
	}
	tk := timelineKey{s.System, s.Class}
	tl := r.timeline[tk]
	if sec >= len(tl) {
		tl = append(tl, make([]*Histogram, sec+1-len(tl))...)
		r.timeline[tk] = tl
	}
	if tl[sec] == nil {
		tl[sec] = new(Histogram)
	}
	tl[sec].Record(s.Latency)
}

// Dropped returns how many samples fell past the timeline's last second.
func (r *Recorder) Dropped() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.dropped
}

// Systems returns the systems seen, in order of their first sample.
func (r *Recorder) Systems() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.systems)
}

// Phases returns the phases seen, in order of their first sample.
func (r *Recorder) Phases() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.phases)
}

// Histogram returns a copy of the histogram of system × phase × class; an
// empty phase ("") merges all phases.
func (r *Recorder) Histogram(system, phase string, class Class) *Histogram {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.histLocked(system, phase, class)
}

// histLocked is Histogram; r.mu must be held.
func (r *Recorder) histLocked(system, phase string, class Class) *Histogram {
	out := new(Histogram)
	if phase != "" {
		out.Merge(r.byPhase[phaseKey{system, phase, class}])
		return out
	}
	for _, p := range r.phases {
		out.Merge(r.byPhase[phaseKey{system, p, class}])
	}
	return out
}

// Latencies summarises system's samples: overall per class, and per phase ×
// class with ratios to the same class in the baseline phase. Classes or
// phases without samples are left out.
func (r *Recorder) Latencies(system, baseline string) ([]ClassLatency, []PhaseLatency) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var overall []ClassLatency
	var phases []PhaseLatency
	for _, c := range classes {
		if all := r.histLocked(system, "", c); all.Count() > 0 {
			overall = append(overall, ClassLatency{Class: c, Latency: all.Latency()})
		}
	}
	for _, p := range r.phases {
		for _, c := range classes {
			h := r.byPhase[phaseKey{system, p, c}]
			if h == nil {
				continue
			}
			pl := PhaseLatency{Phase: p, Class: c, Latency: h.Latency()}
			if b := r.byPhase[phaseKey{system, baseline, c}]; b != nil {
				bl := b.Latency()
				pl.P50Ratio = ratio(pl.P50Ms, bl.P50Ms)
				pl.P99Ratio = ratio(pl.P99Ms, bl.P99Ms)
			}
			phases = append(phases, pl)
		}
	}
	return overall, phases
}

func ratio(a, b float64) float64 {
	if b <= 0 {
		return 0
	}
	return a / b
}

// Point is one second of a timeline.
type Point struct {
	// Second since the run's start.
	Second int `json:"second"`
	// Count of samples in that second (0: no latency figures).
	Count uint64 `json:"count"`
	// P50Ms, P99Ms and MaxMs are that second's latencies in milliseconds.
	P50Ms float64 `json:"p50_ms"`
	P99Ms float64 `json:"p99_ms"`
	MaxMs float64 `json:"max_ms"`
}

// Timeline returns system × class per second, from second 0 to the last
// second with a sample; seconds without samples have Count 0.
func (r *Recorder) Timeline(system string, class Class) []Point {
	r.mu.Lock()
	defer r.mu.Unlock()
	tl := r.timeline[timelineKey{system, class}]
	out := make([]Point, len(tl))
	for s, h := range tl {
		out[s] = Point{Second: s}
		if h != nil {
			out[s].Count = h.Count()
			out[s].P50Ms = ms(h.Quantile(0.50))
			out[s].P99Ms = ms(h.Quantile(0.99))
			out[s].MaxMs = ms(h.Max())
		}
	}
	return out
}

// Timelines returns Timeline(system, class) for every system, keyed by
// system, ready for WriteChart.
func (r *Recorder) Timelines(class Class) map[string][]Point {
	out := make(map[string][]Point)
	for _, s := range r.Systems() {
		out[s] = r.Timeline(s, class)
	}
	return out
}
