package health

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// spacing yields the gaps between consecutive outcomes of a scenario.
type spacing func() time.Duration

// fixed spaces outcomes d apart.
func fixed(d time.Duration) spacing { return func() time.Duration { return d } }

// uniform spaces outcomes uniformly between lo and hi apart, reproducibly.
func uniform(seed uint64, lo, hi time.Duration) spacing {
	rng := rand.New(rand.NewPCG(seed, seed))
	return func() time.Duration { return lo + time.Duration(rng.Int64N(int64(hi-lo)+1)) }
}

func TestHangingOrRefusingDestinationTripsWithin10s(t *testing.T) {
	type pattern struct {
		name string
		gap  func() spacing
	}
	patterns := []pattern{
		{"every 1s", func() spacing { return fixed(time.Second) }},
		{"every 2s", func() spacing { return fixed(2 * time.Second) }},
		{"every 3s", func() spacing { return fixed(3 * time.Second) }},
	}
	for seed := range uint64(20) {
		patterns = append(patterns, pattern{fmt.Sprintf("every 1-3s seed %d", seed), func() spacing {
			return uniform(seed, time.Second, 3*time.Second)
		}})
	}
	kinds := []struct {
		name  string
		class eventv1.ErrorClass
		// silence between the last success and the first failure: a hanging
		// destination's attempts take the whole 10s timeout to fail.
		silence time.Duration
	}{
		{"hanging", timeout, 9 * time.Second},
		{"refusing", refused, 250 * time.Millisecond},
	}
	for _, k := range kinds {
		for _, pt := range patterns {
			t.Run(k.name+" "+pt.name, func(t *testing.T) {
				m := newMachine(t, nil)
				next := pt.gap()
				at := epoch()
				var got []decided
				// A minute of healthy traffic at the same pace first.
				for end := at.Add(time.Minute); at.Before(end); at = at.Add(next()) {
					observe(m, outcome("d", ok, at), &got)
				}
				first := at.Add(k.silence)
				for at = first; len(got) == 0 && at.Sub(first) <= time.Minute; at = at.Add(next()) {
					observe(m, outcome("d", k.class, at), &got)
				}
				if len(got) == 0 {
					t.Fatal("never quarantined")
				}
				wantState(t, got[0].dec, eventv1.State_STATE_QUARANTINED)
				if took := got[0].at.Sub(first); took > 10*time.Second {
					t.Fatalf("quarantined %v after the first failure (%q), want within 10s", took, got[0].dec.GetReason())
				}
			})
		}
	}
}

func TestOneFailureInFiftyNeverTrips(t *testing.T) {
	paces := []time.Duration{3 * time.Second, time.Second, 200 * time.Millisecond, 50 * time.Millisecond, 5 * time.Millisecond}
	classes := []eventv1.ErrorClass{timeout, refused, server, client, throttled, other}
	for _, pace := range paces {
		for _, class := range classes {
			t.Run(fmt.Sprintf("%s every %v", class, pace), func(t *testing.T) {
				m := newMachine(t, nil)
				var got []decided
				start := epoch()
				for i, at := 0, start; at.Sub(start) < 10*time.Minute; i, at = i+1, at.Add(pace) {
					c := ok
					if i%50 == 49 {
						c = class
					}
					observe(m, outcome("d", c, at), &got)
				}
				if len(got) > 0 {
					t.Fatalf("quarantined: %q", got[0].dec.GetReason())
				}
			})
		}
	}
	t.Run("random one in fifty, mixed classes", func(t *testing.T) {
		m := newMachine(t, nil)
		rng := rand.New(rand.NewPCG(7, 7))
		var got []decided
		start := epoch()
		for at := start; at.Sub(start) < 10*time.Minute; at = at.Add(time.Duration(rng.Int64N(int64(100 * time.Millisecond)))) {
			c := ok
			if rng.IntN(50) == 0 {
				c = classes[rng.IntN(len(classes))]
			}
			observe(m, outcome("d", c, at), &got)
		}
		if len(got) > 0 {
			t.Fatalf("quarantined: %q", got[0].dec.GetReason())
		}
	})
}

func TestSlowButSuccessfulNeverTrips(t *testing.T) {
	for _, latency := range []float64{2_000, 9_500} {
		t.Run(fmt.Sprintf("latency %vms of 10s", latency), func(t *testing.T) {
			m := newMachine(t, nil)
			var got []decided
			start := epoch()
			at := start
			for ; at.Sub(start) < 10*time.Minute; at = at.Add(100 * time.Millisecond) {
				o := outcome("d", ok, at)
				o.LatencyMs = latency
				observe(m, o, &got)
			}
			if len(got) > 0 {
				t.Fatalf("quarantined: %q", got[0].dec.GetReason())
			}
			s := windowOf(t, m, "d", at)
			if math.Abs(s.p50-latency) > 0.125*latency || s.ErrorRate() != 0 {
				t.Fatalf("window = %+v, want p50 near %v and no errors", s, latency)
			}
			wantSlow := int64(0)
			if latency >= 8_000 {
				wantSlow = s.Attempts
			}
			if s.Slow != wantSlow {
				t.Fatalf("Slow = %d, want %d", s.Slow, wantSlow)
			}
		})
	}
}

func TestThrottledDestination(t *testing.T) {
	t.Run("a few 429s with Retry-After do not trip", func(t *testing.T) {
		m := newMachine(t, nil)
		var got []decided
		start := epoch()
		for i, at := 0, start; at.Sub(start) < 10*time.Minute; i, at = i+1, at.Add(200*time.Millisecond) {
			o := outcome("d", ok, at)
			if i%100 < 10 { // bursts of ten 429s every 20s
				o = outcome("d", throttled, at)
				o.RetryAfterMs = 1000
			}
			observe(m, o, &got)
		}
		if len(got) > 0 {
			t.Fatalf("quarantined: %q", got[0].dec.GetReason())
		}
	})
	t.Run("only 429 for two minutes trips", func(t *testing.T) {
		m := newMachine(t, nil)
		var got []decided
		start := epoch()
		for at := start; len(got) == 0 && at.Sub(start) < 10*time.Minute; at = at.Add(5 * time.Second) {
			o := outcome("d", throttled, at)
			o.RetryAfterMs = 5000
			observe(m, o, &got)
		}
		if len(got) == 0 {
			t.Fatal("never quarantined")
		}
		wantState(t, got[0].dec, eventv1.State_STATE_QUARANTINED)
		if took := got[0].at.Sub(start); took != 2*time.Minute {
			t.Fatalf("quarantined after %v, want 2m", took)
		}
		if r := got[0].dec.GetReason(); !strings.HasPrefix(r, "only 429 Too Many Requests for 2m0s") {
			t.Fatalf("reason = %q", r)
		}
	})
}

// quarantineNow trips dest with five 5xx a second apart ending at at.
func quarantineNow(t *testing.T, m *Machine, dest string, at time.Time) *eventv1.Decision {
	t.Helper()
	var got []decided
	for i := 4; i >= 0; i-- {
		observe(m, outcome(dest, server, at.Add(-time.Duration(i)*time.Second)), &got)
	}
	if len(got) != 1 {
		t.Fatalf("got %d decisions, want 1", len(got))
	}
	wantState(t, got[0].dec, eventv1.State_STATE_QUARANTINED)
	return got[0].dec
}

// probe ticks at the quarantined dest's next probe and reports probeErr.
func probe(t *testing.T, m *Machine, dest string, probeErr error) (*eventv1.Decision, time.Time) {
	t.Helper()
	q := mustDecision(t, m, dest)
	wantState(t, q, eventv1.State_STATE_QUARANTINED)
	due := q.GetNextProbe().AsTime()
	if early := m.Tick(due.Add(-time.Millisecond)); len(early) != 0 {
		t.Fatalf("Tick before next probe = %v, want nothing", early)
	}
	ticked := m.Tick(due)
	if len(ticked) != 1 {
		t.Fatalf("Tick at next probe = %d decisions, want 1", len(ticked))
	}
	wantState(t, ticked[0], eventv1.State_STATE_PROBING)
	now := due.Add(500 * time.Millisecond)
	dec, err := m.ProbeResult(dest, probeErr, now)
	if err != nil {
		t.Fatalf("ProbeResult: %v", err)
	}
	return dec, now
}

func TestProbeBackoffDoublesAndCaps(t *testing.T) {
	m := newMachine(t, nil)
	q := quarantineNow(t, m, "d", epoch())
	if got := q.GetNextProbe().AsTime().Sub(q.GetSince().AsTime()); got != 2*time.Second {
		t.Fatalf("first probe after %v, want 2s", got)
	}
	want := []time.Duration{4, 8, 16, 30, 30, 30, 30}
	for i, w := range want {
		dec, now := probe(t, m, "d", errors.New("connection refused"))
		wantState(t, dec, eventv1.State_STATE_QUARANTINED)
		if dec.GetProbeFailures() != int32(i+1) {
			t.Fatalf("probe_failures = %d, want %d", dec.GetProbeFailures(), i+1)
		}
		if got := dec.GetNextProbe().AsTime().Sub(now); got != w*time.Second {
			t.Fatalf("after %d failed probes, next in %v, want %v", i+1, got, w*time.Second)
		}
		if dec.GetReason() != "probe failed: connection refused" {
			t.Fatalf("reason = %q", dec.GetReason())
		}
	}
	dec, _ := probe(t, m, "d", nil)
	wantState(t, dec, eventv1.State_STATE_RECOVERING)
}

func TestProbeBackoffJitterInjected(t *testing.T) {
	for _, r := range []float64{0, 0.999999} {
		p := DefaultPolicy()
		m, err := New(p, func() float64 { return r })
		if err != nil {
			t.Fatal(err)
		}
		q := quarantineNow(t, m, "d", epoch())
		got := q.GetNextProbe().AsTime().Sub(q.GetSince().AsTime())
		if got < 1600*time.Millisecond || got > 2400*time.Millisecond || (r == 0) != (got == 1600*time.Millisecond) {
			t.Fatalf("jitter %v: first probe after %v, want in [1.6s, 2.4s]", r, got)
		}
	}
}

func TestProbeWithoutResultTimesOut(t *testing.T) {
	m := newMachine(t, nil)
	q := quarantineNow(t, m, "d", epoch())
	due := q.GetNextProbe().AsTime()
	wantState(t, m.Tick(due)[0], eventv1.State_STATE_PROBING)
	if got := m.Tick(due.Add(29 * time.Second)); len(got) != 0 {
		t.Fatalf("Tick before the probe timeout = %v", got)
	}
	got := m.Tick(due.Add(30 * time.Second))
	if len(got) != 1 {
		t.Fatalf("Tick at the probe timeout = %d decisions, want 1", len(got))
	}
	wantState(t, got[0], eventv1.State_STATE_QUARANTINED)
	if got[0].GetProbeFailures() != 1 || got[0].GetReason() != "probe failed: no result within 30s" {
		t.Fatalf("decision = %v", got[0])
	}
	if _, err := m.ProbeResult("d", nil, due.Add(31*time.Second)); !errors.Is(err, ErrWrongState) {
		t.Fatalf("late ProbeResult = %v, want ErrWrongState", err)
	}
}

func TestFlappingKeepsProbeBackoff(t *testing.T) {
	m := newMachine(t, nil)
	q := quarantineNow(t, m, "d", epoch())
	if q.GetProbeFailures() != 0 {
		t.Fatalf("probe_failures = %d, want 0", q.GetProbeFailures())
	}
	rec, now := probe(t, m, "d", nil)
	wantState(t, rec, eventv1.State_STATE_RECOVERING)

	// Fails again while replaying its backlog: one step further.
	q = quarantineNow(t, m, "d", now.Add(10*time.Second))
	if q.GetProbeFailures() != 1 || q.GetNextProbe().AsTime().Sub(q.GetSince().AsTime()) != 4*time.Second {
		t.Fatalf("flap while recovering: %v, want probe_failures 1 and next probe in 4s", q)
	}
	if !strings.Contains(q.GetReason(), "after recovery") {
		t.Fatalf("reason = %q, want it to say it flapped", q.GetReason())
	}

	// Recovers fully, then fails again a minute later: further still.
	_, now = probe(t, m, "d", nil)
	h, err := m.Drained("d", now.Add(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	wantState(t, h, eventv1.State_STATE_HEALTHY)
	if h.GetProbeFailures() != 1 {
		t.Fatalf("healthy decision keeps probe_failures %d, want 1 as flap memory", h.GetProbeFailures())
	}
	q = quarantineNow(t, m, "d", now.Add(time.Minute))
	if q.GetProbeFailures() != 2 || q.GetNextProbe().AsTime().Sub(q.GetSince().AsTime()) != 8*time.Second {
		t.Fatalf("flap after healing: %v, want probe_failures 2 and next probe in 8s", q)
	}

	// Healthy for longer than the cooldown: back to the first step.
	_, now = probe(t, m, "d", nil)
	if _, err := m.Drained("d", now); err != nil {
		t.Fatal(err)
	}
	q = quarantineNow(t, m, "d", now.Add(5*time.Minute+time.Second))
	if q.GetProbeFailures() != 0 || q.GetNextProbe().AsTime().Sub(q.GetSince().AsTime()) != 2*time.Second {
		t.Fatalf("trip after the cooldown: %v, want probe_failures 0 and next probe in 2s", q)
	}
}

func TestRecoveringIgnoresOutcomesFromBeforeRecovery(t *testing.T) {
	m := newMachine(t, nil)
	start := epoch()
	quarantineNow(t, m, "d", start)
	rec, now := probe(t, m, "d", nil)
	wantState(t, rec, eventv1.State_STATE_RECOVERING)
	var got []decided
	// Attempts still in flight when the probe succeeded fail late.
	for i := range 10 {
		o := outcome("d", timeout, now.Add(-time.Duration(i+1)*100*time.Millisecond))
		got = append(got, decidedAll(now, m.Observe(o, now))...)
	}
	if len(got) != 0 {
		t.Fatalf("late outcomes quarantined again: %q", got[0].dec.GetReason())
	}
	if s := windowOf(t, m, "d", now); s.Attempts != 0 {
		t.Fatalf("window after recovery holds %d attempts, want 0", s.Attempts)
	}
}

// decidedAll stamps decisions made at at.
func decidedAll(at time.Time, decs []*eventv1.Decision) []decided {
	out := make([]decided, len(decs))
	for i, d := range decs {
		out[i] = decided{at, d}
	}
	return out
}

// operator loads an operator's decision for dest, as the engine does when
// the admin API stores one: the machine has no operator transitions of its
// own, it only honours the stored decision.
func operator(t *testing.T, m *Machine, dest string, state eventv1.State, now time.Time) *eventv1.Decision {
	t.Helper()
	var rev uint64
	if cur, err := m.Decision(dest); err == nil {
		rev = cur.GetRevision()
	}
	d := &eventv1.Decision{DestinationId: dest, State: state, Reason: "operator: test", DecidedBy: "operator:alice",
		Since: timestamppb.New(now), Revision: rev + 1}
	if err := m.Load(d); err != nil {
		t.Fatal(err)
	}
	return mustDecision(t, m, dest)
}

func TestPauseOverridesPolicyAndProbes(t *testing.T) {
	t.Run("healthy", func(t *testing.T) {
		m := newMachine(t, nil)
		now := epoch()
		wantState(t, operator(t, m, "d", eventv1.State_STATE_PAUSED, now), eventv1.State_STATE_PAUSED)
		var got []decided
		for i := range 100 {
			observe(m, outcome("d", timeout, now.Add(time.Duration(i)*time.Second)), &got)
		}
		got = append(got, decidedAll(now, m.Tick(now.Add(time.Hour)))...)
		if len(got) != 0 {
			t.Fatalf("paused destination decided %v", got[0].dec)
		}
	})
	t.Run("quarantined", func(t *testing.T) {
		m := newMachine(t, nil)
		q := quarantineNow(t, m, "d", epoch())
		operator(t, m, "d", eventv1.State_STATE_PAUSED, q.GetSince().AsTime().Add(time.Second))
		if got := m.Tick(q.GetNextProbe().AsTime().Add(time.Hour)); len(got) != 0 {
			t.Fatalf("paused destination probed: %v", got)
		}
	})
	t.Run("probing", func(t *testing.T) {
		m := newMachine(t, nil)
		q := quarantineNow(t, m, "d", epoch())
		due := q.GetNextProbe().AsTime()
		m.Tick(due)
		operator(t, m, "d", eventv1.State_STATE_PAUSED, due.Add(time.Second))
		if _, err := m.ProbeResult("d", nil, due.Add(2*time.Second)); !errors.Is(err, ErrWrongState) {
			t.Fatalf("ProbeResult while paused = %v, want ErrWrongState", err)
		}
		if got := m.Tick(due.Add(time.Hour)); len(got) != 0 {
			t.Fatalf("paused destination timed out a probe: %v", got)
		}
		wantState(t, mustDecision(t, m, "d"), eventv1.State_STATE_PAUSED)
	})
}

// TestOperatorResumeStartsAFreshWindow: an operator's RECOVERING decision
// (a resume) clears the failures that led to the quarantine, so the
// destination is not quarantined again for them, and drains to HEALTHY.
func TestOperatorResumeStartsAFreshWindow(t *testing.T) {
	m := newMachine(t, nil)
	start := epoch()
	quarantineNow(t, m, "d", start)
	probe(t, m, "d", errors.New("refused"))
	operator(t, m, "d", eventv1.State_STATE_PAUSED, start.Add(time.Minute))
	now := start.Add(2 * time.Minute)
	wantState(t, operator(t, m, "d", eventv1.State_STATE_RECOVERING, now), eventv1.State_STATE_RECOVERING)
	if s := windowOf(t, m, "d", now); s.Attempts != 0 || s.consecutive != 0 {
		t.Fatalf("window after resume = %+v, want empty", s)
	}
	h, err := m.Drained("d", now.Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	wantState(t, h, eventv1.State_STATE_HEALTHY)
	if _, err := m.Drained("d", now.Add(2*time.Minute)); !errors.Is(err, ErrWrongState) {
		t.Fatalf("Drained when healthy = %v, want ErrWrongState", err)
	}
}

// window is what a test reads of a destination's window.
type window struct {
	Counts
	consecutive int
	p50         float64
}

// windowOf reads dest's window at now (the machine's own, not a copy kept
// for the admin API: that lives in the engine).
func windowOf(t *testing.T, m *Machine, dest string, now time.Time) window {
	t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	d, ok := m.dests[dest]
	if !ok {
		t.Fatalf("%s not tracked", dest)
	}
	if d.win == nil {
		return window{}
	}
	return window{Counts: d.win.Counts(now), consecutive: d.win.Consecutive(now), p50: d.win.Latency(now, 0.5)}
}

func TestTransitionsRejectedInWrongState(t *testing.T) {
	m := newMachine(t, nil)
	now := epoch()
	m.Observe(outcome("d", ok, now), now)
	if _, err := m.ProbeResult("d", nil, now); !errors.Is(err, ErrWrongState) {
		t.Errorf("ProbeResult when healthy = %v, want ErrWrongState", err)
	}
	if _, err := m.Drained("d", now); !errors.Is(err, ErrWrongState) {
		t.Errorf("Drained when healthy = %v, want ErrWrongState", err)
	}
	if _, err := m.Drained("nope", now); !errors.Is(err, ErrUnknownDestination) {
		t.Errorf("Drained unknown = %v, want ErrUnknownDestination", err)
	}
	if _, err := m.ProbeResult("nope", nil, now); !errors.Is(err, ErrUnknownDestination) {
		t.Errorf("ProbeResult unknown = %v, want ErrUnknownDestination", err)
	}
}

func TestRevisionStrictlyIncreases(t *testing.T) {
	m := newMachine(t, nil)
	start := epoch()
	var decs []*eventv1.Decision
	keep := func(d *eventv1.Decision, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		decs = append(decs, d)
	}
	// probeNow ticks to the due probe and reports probeErr.
	probeNow := func(probeErr error) time.Time {
		t.Helper()
		due := mustDecision(t, m, "d").GetNextProbe().AsTime()
		decs = append(decs, m.Tick(due)...)
		keep(m.ProbeResult("d", probeErr, due.Add(time.Second)))
		return due.Add(time.Second)
	}
	decs = append(decs, quarantineNow(t, m, "d", start))
	probeNow(errors.New("refused"))
	now := probeNow(nil)
	keep(m.Drained("d", now.Add(time.Second)))
	decs = append(decs, quarantineNow(t, m, "d", now.Add(time.Hour)))
	decs = append(decs, operator(t, m, "d", eventv1.State_STATE_PAUSED, now.Add(2*time.Hour)))
	decs = append(decs, operator(t, m, "d", eventv1.State_STATE_RECOVERING, now.Add(3*time.Hour)))
	decs = append(decs, quarantineNow(t, m, "d", now.Add(4*time.Hour)))
	decs = append(decs, m.Tick(now.Add(5*time.Hour))...)
	decs = append(decs, m.Tick(now.Add(6*time.Hour))...)
	if len(decs) != 12 {
		t.Fatalf("got %d decisions, want 12", len(decs))
	}
	for i, d := range decs {
		if d.GetRevision() != uint64(i+1) {
			t.Fatalf("decision %d (%s) has revision %d, want %d", i, d.GetState(), d.GetRevision(), i+1)
		}
		if i > 0 && d.GetSince().AsTime().Before(decs[i-1].GetSince().AsTime()) {
			t.Fatalf("decision %d goes back in time", i)
		}
		if d.GetDestinationId() != "d" || d.GetTenantId() != "tenant-1" {
			t.Fatalf("decision %d = %v, want destination d of tenant-1", i, d)
		}
	}
}

func TestLoadThenContinue(t *testing.T) {
	m := newMachine(t, nil)
	now := epoch()
	stored := &eventv1.Decision{
		DestinationId: "d",
		TenantId:      "tenant-1",
		State:         eventv1.State_STATE_QUARANTINED,
		Reason:        "5 consecutive timeouts",
		Since:         timestamppb.New(now.Add(-time.Minute)),
		NextProbe:     timestamppb.New(now.Add(10 * time.Second)),
		DecidedBy:     "policy",
		Revision:      7,
		ProbeFailures: 2,
	}
	if err := m.Load(stored); err != nil {
		t.Fatal(err)
	}
	stale := &eventv1.Decision{DestinationId: "d", State: eventv1.State_STATE_HEALTHY, Revision: 5}
	if err := m.Load(stale); err != nil {
		t.Fatal(err)
	}
	if got := mustDecision(t, m, "d"); got.GetRevision() != 7 || got.GetState() != eventv1.State_STATE_QUARANTINED {
		t.Fatalf("after a stale load: %v", got)
	}
	// The store's decision is not shared.
	stored.Revision = 100
	if got := mustDecision(t, m, "d"); got.GetRevision() != 7 {
		t.Fatalf("revision = %d, want 7", got.GetRevision())
	}

	if got := m.Tick(now); len(got) != 0 {
		t.Fatalf("Tick before next probe = %v", got)
	}
	p := m.Tick(now.Add(10 * time.Second))
	if len(p) != 1 {
		t.Fatalf("Tick at next probe = %v", p)
	}
	wantState(t, p[0], eventv1.State_STATE_PROBING)
	if p[0].GetRevision() != 8 || p[0].GetProbeFailures() != 2 || p[0].GetReason() != "probe 3" {
		t.Fatalf("probing decision = %v", p[0])
	}
	q, err := m.ProbeResult("d", errors.New("timeout"), now.Add(11*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if q.GetRevision() != 9 || q.GetProbeFailures() != 3 || q.GetNextProbe().AsTime().Sub(now.Add(11*time.Second)) != 16*time.Second {
		t.Fatalf("after a failed probe: %v, want revision 9, 3 failures, next probe in 16s", q)
	}
}

func TestLoad(t *testing.T) {
	now := epoch()
	tests := []struct {
		name    string
		dec     *eventv1.Decision
		wantErr error
		want    eventv1.State
	}{
		{"nil", nil, ErrInvalidArgument, 0},
		{"no destination", &eventv1.Decision{Revision: 1}, ErrInvalidArgument, 0},
		{"unknown state", &eventv1.Decision{DestinationId: "d", State: 42, Revision: 1}, ErrInvalidArgument, 0},
		{"unspecified is healthy", &eventv1.Decision{DestinationId: "d", Revision: 3}, nil, eventv1.State_STATE_HEALTHY},
		{"paused", &eventv1.Decision{DestinationId: "d", State: eventv1.State_STATE_PAUSED, Revision: 3, DecidedBy: "operator:alice"}, nil, eventv1.State_STATE_PAUSED},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newMachine(t, nil)
			err := m.Load(tt.dec)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Load = %v, want %v", err, tt.wantErr)
			}
			if err != nil {
				return
			}
			if got := mustDecision(t, m, "d"); got.GetState() != tt.want || got.GetRevision() != 3 {
				t.Fatalf("after Load: %v", got)
			}
		})
	}
	t.Run("probing times out after failover", func(t *testing.T) {
		m := newMachine(t, nil)
		err := m.Load(&eventv1.Decision{
			DestinationId: "d", State: eventv1.State_STATE_PROBING, Revision: 4,
			Since: timestamppb.New(now.Add(-time.Minute)), ProbeFailures: 1,
		})
		if err != nil {
			t.Fatal(err)
		}
		got := m.Tick(now)
		if len(got) != 1 || got[0].GetState() != eventv1.State_STATE_QUARANTINED || got[0].GetRevision() != 5 || got[0].GetProbeFailures() != 2 {
			t.Fatalf("Tick = %v, want a failed probe at revision 5", got)
		}
	})
	t.Run("recovering then drained", func(t *testing.T) {
		m := newMachine(t, nil)
		err := m.Load(&eventv1.Decision{
			DestinationId: "d", State: eventv1.State_STATE_RECOVERING, Revision: 9, Since: timestamppb.New(now),
		})
		if err != nil {
			t.Fatal(err)
		}
		// Outcomes from before the recovery do not count against it.
		for i := range 10 {
			if got := m.Observe(outcome("d", timeout, now.Add(-time.Duration(i+1)*time.Second)), now); got != nil {
				t.Fatalf("stale outcome decided %v", got)
			}
		}
		h, err := m.Drained("d", now.Add(time.Minute))
		if err != nil {
			t.Fatal(err)
		}
		wantState(t, h, eventv1.State_STATE_HEALTHY)
		if h.GetRevision() != 10 {
			t.Fatalf("revision = %d, want 10", h.GetRevision())
		}
	})
}

func TestObserveIgnores(t *testing.T) {
	now := epoch()
	tests := []struct {
		name string
		o    func(i int) *eventv1.Outcome
	}{
		{"nil outcome", func(int) *eventv1.Outcome { return nil }},
		{"no destination", func(int) *eventv1.Outcome { return outcome("", timeout, now) }},
		{"probe outcomes", func(int) *eventv1.Outcome {
			o := outcome("d", timeout, now)
			o.Probe = true
			return o
		}},
		{"outcomes older than the window", func(i int) *eventv1.Outcome {
			return outcome("d", timeout, now.Add(-31*time.Second-time.Duration(i)*time.Millisecond))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newMachine(t, nil)
			for i := range 50 {
				if got := m.Observe(tt.o(i), now); got != nil {
					t.Fatalf("Observe = %v, want nothing", got)
				}
			}
			if n := attemptsOf(m, "d", now); n != 0 {
				t.Fatalf("recorded %d attempts", n)
			}
		})
	}
}

func TestObserveUsesNowForFutureTimes(t *testing.T) {
	m := newMachine(t, nil)
	now := epoch()
	m.Observe(outcome("d", ok, now.Add(time.Hour)), now)
	if n := attemptsOf(m, "d", now); n != 1 || !m.dests["d"].win.LastSuccess().Equal(now) {
		t.Fatalf("%d attempts, last success %v: want the attempt counted at now", n, m.dests["d"].win.LastSuccess())
	}
}

func TestForgetDropsADestination(t *testing.T) {
	m := newMachine(t, nil)
	now := epoch()
	m.Observe(outcome("d", ok, now), now)
	if d, err := m.Decision("d"); err != nil || d.GetState() != eventv1.State_STATE_HEALTHY || d.GetRevision() != 0 {
		t.Fatalf("decision = %v, %v; want healthy at revision 0", d, err)
	}
	if _, err := m.Decision("nope"); !errors.Is(err, ErrUnknownDestination) {
		t.Fatalf("Decision unknown = %v, want ErrUnknownDestination", err)
	}
	m.Forget("d")
	if _, err := m.Decision("d"); !errors.Is(err, ErrUnknownDestination) {
		t.Fatalf("Decision after Forget = %v, want ErrUnknownDestination", err)
	}
}

// attemptsOf is the number of attempts in dest's window, 0 when untracked.
func attemptsOf(m *Machine, dest string, now time.Time) int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	if d, ok := m.dests[dest]; ok && d.win != nil {
		return d.win.Counts(now).Attempts
	}
	return 0
}

func TestMachineIsSafeForConcurrentUse(t *testing.T) {
	m := newMachine(t, nil)
	start := epoch()
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			dest := fmt.Sprintf("d%d", g%2)
			m.SetDomain(dest, "tenant-1", "net-a")
			for i := range 2000 {
				at := start.Add(time.Duration(i) * 10 * time.Millisecond)
				c := ok
				if i%3 == 0 {
					c = timeout
				}
				m.Observe(outcome(dest, c, at), at)
				if i%100 == 0 {
					m.Tick(at)
					_, _ = m.Decision(dest)
					_, _ = m.ProbeResult(dest, nil, at)
				}
			}
		})
	}
	wg.Wait()
}

func BenchmarkObserve(b *testing.B) {
	for _, n := range []int{1, 1000, 10000} {
		dests := make([]string, n)
		for i := range dests {
			dests[i] = fmt.Sprintf("dest-%d", i)
		}
		for _, mix := range []struct {
			name string
			fail int // one attempt in fail fails; 0 for none
		}{{"success", 0}, {"1in50-5xx", 50}} {
			b.Run(fmt.Sprintf("dests=%d/%s", n, mix.name), func(b *testing.B) {
				m := newMachine(b, nil)
				now := epoch()
				os := []*eventv1.Outcome{outcome("", ok, now), outcome("", server, now)}
				b.ReportAllocs()
				i := 0
				for b.Loop() {
					o := os[0]
					if mix.fail > 0 && i%mix.fail == 0 {
						o = os[1]
					}
					o.DestinationId = dests[i%n]
					o.At = nil
					now = now.Add(time.Millisecond)
					m.Observe(o, now)
					i++
				}
			})
		}
	}
}
