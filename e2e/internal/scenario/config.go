// Package scenario runs the noisy-neighbor scenario against one system under
// test: a fleet of real HTTP destinations, an open-loop load generator with
// one tenant per destination, and the phases warm-up, steady, outage (a share
// of the destinations fails), recovery (they heal) and drain, measuring every
// impression from its scheduled submit time to its arrival.
package scenario

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/bulkhead-io/bulkhead/e2e/internal/fleet"
)

// Phase names, in order. Samples belong to the phase their impression was
// scheduled in; nothing is submitted during the drain.
const (
	PhaseWarmup   = "warm-up"
	PhaseSteady   = "steady"
	PhaseOutage   = "outage"
	PhaseRecovery = "recovery"
	PhaseDrain    = "drain"
)

// Config sizes a scenario run. The zero value is not usable; start from
// Default.
type Config struct {
	// Destinations is the number of destinations, one tenant each.
	Destinations int
	// FailingShare of the destinations fail during the outage.
	FailingShare float64
	// FailMix lists the behaviours failing destinations take, assigned in
	// turn (so 30% with hang,refused,503 is 10% of each).
	FailMix []fleet.Behavior
	// Rate is the offered load in impressions per second, all tenants
	// together.
	Rate float64
	// Interval is how often each tenant submits a batch.
	Interval time.Duration
	// Phase lengths. The drain lasts until every accepted impression was
	// delivered, or DrainMax.
	Warmup, Steady, Outage, Recovery, DrainMax time.Duration
	// Seed picks the failing destinations; the same seed gives every system
	// the same schedule and the same failing set.
	Seed uint64
	// Linger and Timeout are the destinations' batch linger and request
	// timeout (both systems use the same).
	Linger, Timeout time.Duration
	// MaxBatch caps impressions per POST (both systems).
	MaxBatch int
	// Senders is the number of concurrent submitting goroutines.
	Senders int
	// SlowDelay and FlapPeriod shape the slow-ok and flapping behaviours.
	SlowDelay, FlapPeriod time.Duration
}

// Default returns the default scenario, sized for a 2-core machine: 200
// destinations, 30% failing (hang, refused, 503 in equal parts), 20,000
// impressions/s, a 2:15 load window per system. Each tenant submits one
// batch a second, as an SDK flushing its impressions would: Bulkhead's cost
// is per message, not per impression, and 200 tenants submitting every
// 100 ms (2,000 Submit calls/s of 10 impressions) fall behind on this
// machine (measured: a 3,000/s offer built a 37 s submit backlog), while one
// batch a second per tenant carries 20,000/s at a p99 of ~0.3 s.
func Default() Config {
	return Config{
		Destinations: 200,
		FailingShare: 0.3,
		FailMix:      []fleet.Behavior{fleet.Hang, fleet.Refused, fleet.Status503},
		Rate:         20000,
		Interval:     time.Second,
		Warmup:       15 * time.Second,
		Steady:       30 * time.Second,
		Outage:       60 * time.Second,
		Recovery:     30 * time.Second,
		DrainMax:     90 * time.Second,
		Seed:         1,
		Linger:       100 * time.Millisecond,
		Timeout:      5 * time.Second,
		MaxBatch:     500,
		Senders:      32,
		SlowDelay:    2 * time.Second,
		FlapPeriod:   5 * time.Second,
	}
}

// Validate reports an unusable configuration.
func (c Config) Validate() error {
	var errs []error
	if c.Destinations < 1 || c.Destinations > 10000 {
		errs = append(errs, fmt.Errorf("destinations %d: want 1..10000", c.Destinations))
	}
	if c.FailingShare < 0 || c.FailingShare > 1 {
		errs = append(errs, fmt.Errorf("failing share %v: want 0..1", c.FailingShare))
	}
	if c.FailingShare > 0 && len(c.FailMix) == 0 {
		errs = append(errs, errors.New("failing destinations need a fail mix"))
	}
	if c.Rate <= 0 || c.Interval <= 0 || c.Rate*c.Interval.Seconds() < 1 {
		errs = append(errs, fmt.Errorf("rate %v/s every %v: want at least one impression per interval", c.Rate, c.Interval))
	}
	if n := c.perTenantMax(); n > 1000 {
		errs = append(errs, fmt.Errorf("%d impressions per tenant batch: over the 1,000 a Submit takes; shorten the interval", n))
	}
	if c.Warmup < 0 || c.Steady <= 0 || c.Outage < 0 || c.Recovery < 0 || c.DrainMax <= 0 {
		errs = append(errs, errors.New("phases: steady and drain must be positive, none negative"))
	}
	if c.Linger < 0 || c.Timeout <= 0 || c.MaxBatch < 1 || c.Senders < 1 {
		errs = append(errs, errors.New("linger, timeout, max batch, senders: out of range"))
	}
	return errors.Join(errs...)
}

// ParseMix parses a comma-separated list of behaviour names (fleet names:
// hang, refused, 503, slow-ok, flapping, throttled).
func ParseMix(s string) ([]fleet.Behavior, error) {
	var out []fleet.Behavior
	for name := range strings.SplitSeq(s, ",") {
		name = strings.TrimSpace(name)
		if name == "" {
			continue
		}
		found := false
		for b := fleet.Healthy; b <= fleet.Throttled; b++ {
			if b.String() == name {
				out, found = append(out, b), true
				break
			}
		}
		if !found || name == fleet.Healthy.String() {
			return nil, fmt.Errorf("fail mix: unknown behaviour %q", name)
		}
	}
	return out, nil
}

// Load is the span during which impressions are submitted.
func (c Config) Load() time.Duration { return c.Warmup + c.Steady + c.Outage + c.Recovery }

// OnsetAt and HealAt are the outage's start and end since the run's start.
func (c Config) OnsetAt() time.Duration { return c.Warmup + c.Steady }

// HealAt is when the failing destinations heal, since the run's start.
func (c Config) HealAt() time.Duration { return c.OnsetAt() + c.Outage }

// PhaseAt names the phase of an offset since the run's start.
func (c Config) PhaseAt(d time.Duration) string {
	switch {
	case d < c.Warmup:
		return PhaseWarmup
	case d < c.OnsetAt():
		return PhaseSteady
	case d < c.HealAt():
		return PhaseOutage
	case d < c.Load():
		return PhaseRecovery
	}
	return PhaseDrain
}

// ticks is the number of submission intervals in the load window.
func (c Config) ticks() int { return int(c.Load() / c.Interval) }

// perTick is the number of impressions all tenants submit per interval.
func (c Config) perTick() int { return int(math.Round(c.Rate * c.Interval.Seconds())) }

// perTenantMax is the most impressions one tenant submits per interval.
func (c Config) perTenantMax() int {
	if c.Destinations < 1 {
		return 0
	}
	return (c.perTick() + c.Destinations - 1) / c.Destinations
}

// count is how many impressions tenant i submits at tick k: the per-tick
// total spread evenly, the remainder rotating over the tenants so every
// tenant gets the same share over time.
func (c Config) count(i, k int) int {
	base, rem := c.perTick()/c.Destinations, c.perTick()%c.Destinations
	if (i+k*rem)%c.Destinations < rem {
		return base + 1
	}
	return base
}

// slots spreads the tenants' submissions over each interval: tenant i
// submits at slot i%slots, slot s at s*Interval/slots into the interval.
const slots = 10

// offset is when tenant i's batch of tick k is scheduled, since the run's
// start. It is the impression's submit time for latency.
func (c Config) offset(i, k int) time.Duration {
	return time.Duration(k)*c.Interval + time.Duration(i%slots)*c.Interval/slots
}

// Failing returns, per destination, the behaviour it takes in the outage
// (fleet.Healthy for the destinations that stay healthy): a seeded random
// FailingShare of them, behaviours assigned from FailMix in turn.
func (c Config) Failing() []fleet.Behavior {
	out := make([]fleet.Behavior, c.Destinations)
	n := int(math.Round(c.FailingShare * float64(c.Destinations)))
	if n == 0 || len(c.FailMix) == 0 {
		return out
	}
	r := rand.New(rand.NewPCG(c.Seed, 0x6e6f697379))
	for j, i := range r.Perm(c.Destinations)[:n] {
		out[i] = c.FailMix[j%len(c.FailMix)]
	}
	return out
}
