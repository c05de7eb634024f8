package report

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"slices"
	"strings"
	"time"
)

// Latency summarises latencies in milliseconds.
type Latency struct {
	Count  uint64  `json:"count"`
	MinMs  float64 `json:"min_ms"`
	MeanMs float64 `json:"mean_ms"`
	P50Ms  float64 `json:"p50_ms"`
	P95Ms  float64 `json:"p95_ms"`
	P99Ms  float64 `json:"p99_ms"`
	MaxMs  float64 `json:"max_ms"`
}

// ClassLatency is one class's latency over the whole run.
type ClassLatency struct {
	Class Class `json:"class"`
	Latency
}

// PhaseLatency is one class's latency in one phase. The ratios divide this
// phase's percentile by the same class's in the baseline: the baseline phase
// of the same system (Recorder.Latencies), or, after RatiosTo, the same phase
// of the baseline system (0 when the baseline has no samples); a healthy
// destination's P99Ratio near 1 in the outage phase is what isolation means.
type PhaseLatency struct {
	Phase string `json:"phase"`
	Class Class  `json:"class"`
	Latency
	P50Ratio float64 `json:"p50_ratio_to_baseline"`
	P99Ratio float64 `json:"p99_ratio_to_baseline"`
}

// Spread summarises a handful of per-destination durations.
type Spread struct {
	// Count is the number of destinations measured.
	Count int     `json:"count"`
	P50Ms float64 `json:"p50_ms"`
	MaxMs float64 `json:"max_ms"`
}

// NewSpread returns the exact median (nearest rank) and maximum of ds.
func NewSpread(ds []time.Duration) Spread {
	if len(ds) == 0 {
		return Spread{}
	}
	s := slices.Sorted(slices.Values(ds))
	return Spread{Count: len(s), P50Ms: ms(s[(len(s)-1)/2]), MaxMs: ms(s[len(s)-1])}
}

// FailingResult is how a system handled the failing destinations.
type FailingResult struct {
	// Destinations is the number of failing destinations.
	Destinations int `json:"destinations"`
	// OnsetToQuarantine is, per destination quarantined, the time from the
	// outage's onset to its quarantine decision.
	OnsetToQuarantine Spread `json:"onset_to_quarantine"`
	// Parked is the number of impressions for them parked during the run.
	Parked int64 `json:"parked"`
	// HealToDrained is, per destination, the time from the outage's end to
	// the last of its backlog being delivered.
	HealToDrained Spread `json:"heal_to_drained"`
}

// SystemResult is everything measured for one system under test.
type SystemResult struct {
	// Name identifies the system ("bulkhead", "shared-queue").
	Name string `json:"name"`
	// Overall latency per class, all phases together.
	Overall []ClassLatency `json:"overall"`
	// Phases holds latency per phase × class, in phase order.
	Phases []PhaseLatency `json:"phases"`
	// Accepted impressions (an OK answer from the system).
	Accepted int64 `json:"accepted"`
	// Delivered distinct impressions (a 2xx from their destination).
	Delivered int64 `json:"delivered"`
	// Parked distinct impressions held for replay or export, not delivered.
	Parked int64 `json:"parked"`
	// Lost are accepted impressions neither delivered nor parked at the end.
	Lost int64 `json:"lost"`
	// Duplicates are deliveries of an impression its destination already had.
	Duplicates int64 `json:"duplicates"`
	// ThroughputPerSec is delivered impressions per second of the run.
	ThroughputPerSec float64 `json:"throughput_per_s"`
	// CPUSeconds is the user+system CPU time of the system's processes.
	CPUSeconds float64 `json:"cpu_seconds"`
	// PeakRSSBytes is the largest resident set of the system's processes.
	PeakRSSBytes int64 `json:"peak_rss_bytes"`
	// Failing is nil when the scenario has no failing destinations.
	Failing *FailingResult `json:"failing,omitempty"`
}

// Phase is a named span of the run.
type Phase struct {
	Name     string  `json:"name"`
	StartSec float64 `json:"start_s"`
	EndSec   float64 `json:"end_s"`
}

// Result is the benchmark's report.
type Result struct {
	Title   string    `json:"title"`
	Started time.Time `json:"started"`
	// DurationSec is the run's length.
	DurationSec float64 `json:"duration_s"`
	// Destinations and FailingDestinations describe the fleet.
	Destinations        int `json:"destinations"`
	FailingDestinations int `json:"failing_destinations"`
	// Params are the scenario's knobs as given (rate, batch size, ...).
	Params map[string]string `json:"params,omitempty"`
	// Phases in order; Baseline names the one ratios are taken against.
	Phases   []Phase `json:"phases"`
	Baseline string  `json:"baseline_phase,omitempty"`
	// BaselineSystem, when set, names the system the ratios are taken
	// against (see RatiosTo) instead of a baseline phase.
	BaselineSystem string `json:"baseline_system,omitempty"`
	// Systems in report order.
	Systems []SystemResult `json:"systems"`
	// Notes are printed verbatim at the end (e.g. sharedqueue.Model).
	Notes []string `json:"notes,omitempty"`
}

// RatiosTo sets the ratios of every system's phases to the same phase ×
// class of the system named baseline (the run without failures), so each
// phase is compared with the same seconds of an undisturbed run. Phases the
// baseline lacks get ratio 0.
func RatiosTo(systems []SystemResult, baseline string) {
	type key struct {
		phase string
		class Class
	}
	base := map[key]Latency{}
	for _, s := range systems {
		if s.Name == baseline {
			for _, pl := range s.Phases {
				base[key{pl.Phase, pl.Class}] = pl.Latency
			}
		}
	}
	for si := range systems {
		for pi := range systems[si].Phases {
			pl := &systems[si].Phases[pi]
			b, ok := base[key{pl.Phase, pl.Class}]
			pl.P50Ratio, pl.P99Ratio = 0, 0
			if ok {
				pl.P50Ratio, pl.P99Ratio = ratio(pl.P50Ms, b.P50Ms), ratio(pl.P99Ms, b.P99Ms)
			}
		}
	}
}

// WriteJSON writes r to path as indented JSON.
func WriteJSON(path string, r Result) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("write json %s: %w", path, err)
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write json: %w", err)
	}
	return nil
}

// WriteMarkdown writes r as a Markdown report: the run, the delivery
// accounting, latency per phase for healthy and failing destinations, the
// handling of failing destinations, and the notes.
func WriteMarkdown(w io.Writer, r Result) error {
	b := bufio.NewWriter(w)
	p := func(format string, a ...any) { _, _ = fmt.Fprintf(b, format, a...) }

	p("# %s\n\n", cell(r.Title))
	if !r.Started.IsZero() {
		p("Started %s, ran %s. ", r.Started.UTC().Format(time.RFC3339), fmtSeconds(r.DurationSec))
	}
	p("%d destinations, %d of them failing.", r.Destinations, r.FailingDestinations)
	if r.BaselineSystem != "" {
		p(" Latency ratios compare each phase with the same phase of the %s run.", cell(r.BaselineSystem))
	}
	p("\n\n")
	if len(r.Phases) > 0 {
		p("| phase | from | to |\n|---|---:|---:|\n")
		for _, ph := range r.Phases {
			name := cell(ph.Name)
			if ph.Name == r.Baseline {
				name += " (baseline)"
			}
			p("| %s | %s | %s |\n", name, fmtSeconds(ph.StartSec), fmtSeconds(ph.EndSec))
		}
		p("\n")
	}
	if len(r.Params) > 0 {
		p("| parameter | value |\n|---|---|\n")
		for _, k := range slices.Sorted(maps.Keys(r.Params)) {
			p("| %s | %s |\n", cell(k), cell(r.Params[k]))
		}
		p("\n")
	}

	p("## Delivery\n\n")
	p("| system | accepted | delivered | parked | lost | duplicates | throughput | CPU | peak RSS |\n")
	p("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, s := range r.Systems {
		p("| %s | %d | %d | %d | %d | %d | %.0f/s | %.1f s | %s |\n", cell(s.Name), s.Accepted,
			s.Delivered, s.Parked, s.Lost, s.Duplicates, s.ThroughputPerSec, s.CPUSeconds, fmtBytes(s.PeakRSSBytes))
	}
	p("\n")

	for _, c := range classes {
		p("## %s destinations: end-to-end latency\n\n", titleCase(c.String()))
		p("| system | phase | impressions | p50 | p95 | p99 | max | p50 × baseline | p99 × baseline |\n")
		p("|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
		rows := 0
		for _, s := range r.Systems {
			for _, pl := range s.Phases {
				if pl.Class != c {
					continue
				}
				p("| %s | %s | %d | %s | %s | %s | %s | %s | %s |\n", cell(s.Name), cell(pl.Phase), pl.Count,
					fmtMs(pl.P50Ms), fmtMs(pl.P95Ms), fmtMs(pl.P99Ms), fmtMs(pl.MaxMs), fmtRatio(pl.P50Ratio), fmtRatio(pl.P99Ratio))
				rows++
			}
			for _, cl := range s.Overall {
				if cl.Class == c {
					p("| %s | **all** | %d | %s | %s | %s | %s | | |\n", cell(s.Name), cl.Count,
						fmtMs(cl.P50Ms), fmtMs(cl.P95Ms), fmtMs(cl.P99Ms), fmtMs(cl.MaxMs))
					rows++
				}
			}
		}
		if rows == 0 {
			p("| — | — | 0 | | | | | | |\n")
		}
		p("\n")
	}

	if r.FailingDestinations > 0 {
		p("## Failing destinations: handling\n\n")
		p("| system | quarantined | onset → quarantine p50 | max | parked | drained | heal → drained p50 | max |\n")
		p("|---|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, s := range r.Systems {
			f := s.Failing
			if f == nil {
				p("| %s | — | — | — | — | — | — | — |\n", cell(s.Name))
				continue
			}
			p("| %s | %d / %d | %s | %s | %d | %d / %d | %s | %s |\n", cell(s.Name),
				f.OnsetToQuarantine.Count, f.Destinations, fmtSpreadMs(f.OnsetToQuarantine, f.OnsetToQuarantine.P50Ms),
				fmtSpreadMs(f.OnsetToQuarantine, f.OnsetToQuarantine.MaxMs), f.Parked,
				f.HealToDrained.Count, f.Destinations, fmtSpreadMs(f.HealToDrained, f.HealToDrained.P50Ms),
				fmtSpreadMs(f.HealToDrained, f.HealToDrained.MaxMs))
		}
		p("\n")
	}

	for _, n := range r.Notes {
		p("```text\n%s\n```\n\n", strings.TrimRight(n, "\n"))
	}
	if err := b.Flush(); err != nil {
		return fmt.Errorf("write markdown: %w", err)
	}
	return nil
}

// cell makes s safe inside a Markdown table cell.
func cell(s string) string {
	s = strings.ReplaceAll(s, "|", `\|`)
	return strings.ReplaceAll(s, "\n", " ")
}

func titleCase(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}

// fmtMs prints milliseconds with a unit that keeps three significant digits.
func fmtMs(v float64) string {
	switch {
	case math.IsNaN(v) || v < 0:
		return "—"
	case v < 10:
		return fmt.Sprintf("%.2f ms", v)
	case v < 1000:
		return fmt.Sprintf("%.0f ms", v)
	case v < 60_000:
		return fmt.Sprintf("%.2f s", v/1000)
	default:
		return time.Duration(v * float64(time.Millisecond)).Round(time.Second).String()
	}
}

func fmtSpreadMs(s Spread, v float64) string {
	if s.Count == 0 {
		return "—"
	}
	return fmtMs(v)
}

func fmtSeconds(s float64) string { return fmtMs(s * 1000) }

func fmtRatio(v float64) string {
	if v <= 0 || math.IsNaN(v) || math.IsInf(v, 0) {
		return "—"
	}
	return fmt.Sprintf("%.1f×", v)
}

func fmtBytes(n int64) string {
	if n <= 0 {
		return "—"
	}
	return fmt.Sprintf("%.0f MiB", float64(n)/(1<<20))
}
