package health

import (
	"errors"
	"math"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
)

// ev is one outcome in a policy table: when, after the start, and what.
type ev struct {
	at         time.Duration
	class      eventv1.ErrorClass
	retryAfter time.Duration
}

// every returns n outcomes of class, step apart, from start.
func every(start, step time.Duration, n int, class eventv1.ErrorClass) []ev {
	evs := make([]ev, n)
	for i := range evs {
		evs[i] = ev{at: start + time.Duration(i)*step, class: class}
	}
	return evs
}

// cycle returns n outcomes, step apart from start, cycling through classes.
func cycle(start, step time.Duration, n int, classes ...eventv1.ErrorClass) []ev {
	evs := make([]ev, n)
	for i := range evs {
		evs[i] = ev{at: start + time.Duration(i)*step, class: classes[i%len(classes)]}
	}
	return evs
}

// concat joins outcome lists.
func concat(lists ...[]ev) []ev {
	var all []ev
	for _, l := range lists {
		all = append(all, l...)
	}
	return all
}

func TestPolicyCheck(t *testing.T) {
	tests := []struct {
		name       string
		edit       func(*Policy)
		events     []ev
		wantRule   Rule // "" for no trip
		wantReason string
		wantAt     time.Duration // when it trips
	}{
		{name: "4 consecutive 5xx do not trip", events: every(0, time.Second, 4, server)},
		{
			name: "5 consecutive 5xx trip", events: every(0, time.Second, 5, server),
			wantRule: RuleConsecutive, wantReason: "5 consecutive 5xx responses", wantAt: 4 * time.Second,
		},
		{
			name: "mixed run names the dominant class", events: cycle(0, 4*time.Second, 5, server, other, server),
			wantRule: RuleConsecutive, wantReason: "5 consecutive failures (mostly 5xx responses)", wantAt: 16 * time.Second,
		},
		{
			name:   "a success breaks the run",
			events: concat(every(0, time.Second, 4, server), every(4*time.Second, 0, 1, ok), every(5*time.Second, time.Second, 4, server)),
		},
		{
			name:   "silence longer than the window breaks the run",
			events: concat(every(0, time.Second, 4, server), every(40*time.Second, time.Second, 1, server)),
		},
		{
			name:     "permanent 4xx neither extend nor break the run",
			events:   concat(every(0, time.Second, 3, server), every(3*time.Second, time.Second, 2, client), every(5*time.Second, time.Second, 2, server)),
			wantRule: RuleConsecutive, wantReason: "5 consecutive 5xx responses", wantAt: 6 * time.Second,
		},
		{name: "19 permanent 4xx do not trip", events: every(0, time.Second, 19, client)},
		{
			name: "20 permanent 4xx trip the error rate", events: every(0, time.Second, 20, client),
			wantRule: RuleErrorRate, wantReason: "error rate 100% over 20 attempts (mostly 4xx responses)", wantAt: 19 * time.Second,
		},
		{
			name: "error rate at the threshold trips", events: cycle(0, time.Second, 40, ok, server),
			wantRule: RuleErrorRate, wantReason: "error rate 50% over 20 attempts (mostly 5xx responses)", wantAt: 19 * time.Second,
		},
		{
			name: "error rate 62% over 24 attempts", edit: func(p *Policy) { p.MinAttempts = 24 },
			events:   cycle(0, time.Second, 24, ok, server, server, ok, server, server, ok, server),
			wantRule: RuleErrorRate, wantReason: "error rate 62% over 24 attempts (mostly 5xx responses)", wantAt: 23 * time.Second,
		},
		{name: "error rate below the threshold does not trip", events: cycle(0, 200*time.Millisecond, 600, ok, ok, server)},
		{
			name: "2 timeouts of 2 attempts in 10s trip", events: every(0, 3*time.Second, 3, timeout),
			wantRule: RuleUnreachable, wantReason: "2 timeouts of 2 attempts in the last 10s", wantAt: 3 * time.Second,
		},
		{
			name: "2 refused connections trip", events: every(0, 3*time.Second, 3, refused),
			wantRule: RuleUnreachable, wantReason: "2 connection failures of 2 attempts in the last 10s", wantAt: 3 * time.Second,
		},
		{
			name: "mixed unreachable names the dominant class", events: cycle(0, time.Second, 3, timeout, refused, timeout),
			wantRule: RuleUnreachable, wantReason: "2 attempts without an answer of 2 in the last 10s (mostly timeouts)", wantAt: time.Second,
		},
		{
			name:   "3 timeouts among 4 successes do not trip",
			events: concat(every(0, time.Second, 4, ok), every(4*time.Second, time.Second, 3, timeout)),
		},
		{name: "timeouts 11s apart do not trip", events: every(0, 11*time.Second, 4, timeout)},
		{name: "a few 429s do not trip", events: concat(every(0, 100*time.Millisecond, 50, throttled), every(5*time.Second, 0, 1, ok))},
		{name: "429s for a minute do not trip", events: every(0, time.Second, 60, throttled)},
		{
			name: "only 429 for 2 minutes trips", events: every(0, 5*time.Second, 30, throttled),
			wantRule: RuleThrottled, wantReason: "only 429 Too Many Requests for 2m0s (25 attempts without a 2xx)", wantAt: 2 * time.Minute,
		},
		{
			name:   "429s broken by a success do not trip",
			events: concat(every(0, 5*time.Second, 20, throttled), every(100*time.Second, 0, 1, ok), every(101*time.Second, 5*time.Second, 20, throttled)),
		},
		{
			name:   "429s broken by silence do not trip",
			events: concat(every(0, 5*time.Second, 13, throttled), every(100*time.Second, 5*time.Second, 23, throttled)),
		},
		{
			name: "429s a long Retry-After apart trip",
			events: []ev{
				{0, throttled, time.Minute}, {time.Minute, throttled, time.Minute}, {2 * time.Minute, throttled, time.Minute},
			},
			wantRule: RuleThrottled, wantReason: "only 429 Too Many Requests for 2m0s (3 attempts without a 2xx)", wantAt: 2 * time.Minute,
		},
		{
			name: "429s do not break a run of 5xx", events: cycle(0, time.Second, 10, throttled, server),
			wantRule: RuleConsecutive, wantReason: "5 consecutive 5xx responses", wantAt: 9 * time.Second,
		},
		{name: "429s lower the error rate", events: cycle(0, 100*time.Millisecond, 300, throttled, throttled, server, ok)},
		{
			name: "disabled rules never trip",
			edit: func(p *Policy) {
				p.ConsecutiveFailures, p.ErrorRate, p.MinUnreachable, p.ThrottledFor = 0, 0, 0, 0
			},
			events: concat(every(0, time.Second, 100, timeout), every(100*time.Second, time.Second, 200, throttled)),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := DefaultPolicy()
			if tt.edit != nil {
				tt.edit(&p)
			}
			if err := p.Validate(); err != nil {
				t.Fatalf("Validate: %v", err)
			}
			w := newWindow(p.Window, p.Bucket, p.SlowFraction)
			start := epoch()
			for _, e := range tt.events {
				at := start.Add(e.at)
				o := outcome("d", e.class, at)
				o.RetryAfterMs = e.retryAfter.Milliseconds()
				w.Add(o, at)
				if e.class == ok {
					continue // the Machine checks only after failures
				}
				trip, tripped := p.Check(w, at)
				if !tripped {
					continue
				}
				if tt.wantRule == "" {
					t.Fatalf("tripped at %v: %s %q, want no trip", e.at, trip.Rule, trip.Reason)
				}
				if trip.Rule != tt.wantRule || trip.Reason != tt.wantReason || e.at != tt.wantAt {
					t.Fatalf("tripped at %v: %s %q, want at %v: %s %q", e.at, trip.Rule, trip.Reason, tt.wantAt, tt.wantRule, tt.wantReason)
				}
				return
			}
			if tt.wantRule != "" {
				t.Fatalf("never tripped, want %s %q at %v", tt.wantRule, tt.wantReason, tt.wantAt)
			}
		})
	}
}

func TestPolicyValidate(t *testing.T) {
	tests := []struct {
		name  string
		edit  func(*Policy)
		valid bool
	}{
		{"defaults", func(*Policy) {}, true},
		{"every rule off", func(p *Policy) {
			p.ConsecutiveFailures, p.ErrorRate, p.MinUnreachable, p.ThrottledFor = 0, 0, 0, 0
			p.MinAttempts, p.RecentWindow, p.UnreachableShare, p.MinThrottled = 0, 0, 0, 0
			p.Domain = DomainPolicy{}
		}, true},
		{"zero value", func(p *Policy) { *p = Policy{} }, false},
		{"window not a multiple of bucket", func(p *Policy) { p.Bucket = 7 * time.Second }, false},
		{"too many buckets", func(p *Policy) { p.Bucket = time.Millisecond }, false},
		{"negative consecutive", func(p *Policy) { p.ConsecutiveFailures = -1 }, false},
		{"error rate above one", func(p *Policy) { p.ErrorRate = 1.5 }, false},
		{"error rate NaN", func(p *Policy) { p.ErrorRate = math.NaN() }, false},
		{"error rate without sample", func(p *Policy) { p.MinAttempts = 0 }, false},
		{"recent window beyond window", func(p *Policy) { p.RecentWindow = time.Minute }, false},
		{"unreachable share zero", func(p *Policy) { p.UnreachableShare = 0 }, false},
		{"throttled without evidence", func(p *Policy) { p.MinThrottled = 0 }, false},
		{"slow fraction zero", func(p *Policy) { p.SlowFraction = 0 }, false},
		{"probe max below initial", func(p *Policy) { p.ProbeMax = time.Second }, false},
		{"probe multiplier below one", func(p *Policy) { p.ProbeMultiplier = 0.5 }, false},
		{"probe jitter one", func(p *Policy) { p.ProbeJitter = 1 }, false},
		{"probe timeout zero", func(p *Policy) { p.ProbeTimeout = 0 }, false},
		{"negative flap cooldown", func(p *Policy) { p.FlapCooldown = -time.Second }, false},
		{"domain min tripped zero", func(p *Policy) { p.Domain.MinTripped = 0 }, false},
		{"domain within zero", func(p *Policy) { p.Domain.Within = 0 }, false},
		{"domain off ignores its fields", func(p *Policy) { p.Domain = DomainPolicy{MinTripped: -3} }, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := DefaultPolicy()
			tt.edit(&p)
			err := p.Validate()
			if tt.valid && err != nil {
				t.Fatalf("Validate = %v, want nil", err)
			}
			if !tt.valid && !errors.Is(err, ErrInvalidPolicy) {
				t.Fatalf("Validate = %v, want ErrInvalidPolicy", err)
			}
			if _, err := New(p, nil); tt.valid != (err == nil) {
				t.Fatalf("New = %v, want valid=%v", err, tt.valid)
			}
		})
	}
}

func TestValidateReportsEveryProblem(t *testing.T) {
	p := DefaultPolicy()
	p.ConsecutiveFailures = -1
	p.ProbeJitter = 2
	err := p.Validate()
	for _, want := range []string{"consecutive failures -1", "probe jitter 2"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate = %v, want it to mention %q", err, want)
		}
	}
}

func TestProbeDelay(t *testing.T) {
	p := DefaultPolicy()
	tests := []struct {
		failures int32
		r        float64
		want     time.Duration
	}{
		{0, 0.5, 2 * time.Second},
		{1, 0.5, 4 * time.Second},
		{2, 0.5, 8 * time.Second},
		{3, 0.5, 16 * time.Second},
		{4, 0.5, 30 * time.Second},
		{5, 0.5, 30 * time.Second},
		{30, 0.5, 30 * time.Second},
		{math.MaxInt32, 0.5, 30 * time.Second},
		{-1, 0.5, 2 * time.Second},
		{0, 0, 1600 * time.Millisecond},
		{0, 1, 2400 * time.Millisecond},
		{2, 0, 6400 * time.Millisecond},
		{4, 0, 24 * time.Second},
		{5, 1, 30 * time.Second},
		{0, -3, 1600 * time.Millisecond},
	}
	for _, tt := range tests {
		if got := p.ProbeDelay(tt.failures, tt.r); got != tt.want {
			t.Errorf("ProbeDelay(%d, %v) = %v, want %v", tt.failures, tt.r, got, tt.want)
		}
	}
}

func TestProbeDelayJitterBounds(t *testing.T) {
	p := DefaultPolicy()
	rng := rand.New(rand.NewPCG(1, 2))
	for failures := int32(0); failures < 12; failures++ {
		base := min(p.ProbeInitial<<failures, p.ProbeMax)
		lo := time.Duration(float64(base) * 0.8)
		hi := min(time.Duration(float64(base)*1.2), p.ProbeMax)
		seenLow, seenHigh := false, false
		for range 1000 {
			got := p.ProbeDelay(failures, rng.Float64())
			if got < lo || got > hi {
				t.Fatalf("ProbeDelay(%d) = %v, want in [%v, %v]", failures, got, lo, hi)
			}
			seenLow = seenLow || got < base-base/10
			seenHigh = seenHigh || got > base+base/10 || got == p.ProbeMax
		}
		if !seenLow || !seenHigh {
			t.Errorf("ProbeDelay(%d): jitter does not spread both ways", failures)
		}
	}
}
