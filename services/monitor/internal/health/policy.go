package health

import (
	"errors"
	"fmt"
	"math"
	"time"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
)

// ErrInvalidPolicy is wrapped by Policy.Validate, NewWindow and New for a
// configuration that cannot be used.
var ErrInvalidPolicy = errors.New("invalid health policy")

// Policy says when a destination is quarantined and how it is probed. The
// zero value is not valid; start from DefaultPolicy. A zero threshold turns
// its rule off.
//
// How outcomes count, by error class:
//   - 2xx ends every run of failures.
//   - 5xx and OTHER are failures: error rate and consecutive run.
//   - TIMEOUT, CONNECT, TLS, DNS and BLOCKED got no answer at all: failures
//     as above, and they also feed the unreachable rule, which is what trips
//     a hanging or refusing destination within seconds.
//   - CLIENT (permanent 4xx) counts toward the error rate but neither extends
//     nor breaks a consecutive run: the endpoint is alive and rejects this
//     payload or our credentials. Only a destination rejecting most of what it
//     gets is quarantined, where an operator sees why.
//   - THROTTLED (429, with or without Retry-After) is flow control, not a
//     failure: it counts as an attempt (so it lowers the error rate), never
//     as a failure, and does not touch the consecutive run. The deliverer
//     honours Retry-After. Only the throttled rule, a destination answering
//     nothing but 429 for ThrottledFor, quarantines it, before its backlog
//     fills the shared DELIVERY stream.
type Policy struct {
	// Window is the span of the sliding window. Default 30s.
	Window time.Duration
	// Bucket is the window's resolution; Window must be a multiple of it,
	// at most 3600 buckets. Default 1s.
	Bucket time.Duration

	// ConsecutiveFailures trips after this many failures in a row (429s and
	// permanent 4xx excepted). Default 5.
	ConsecutiveFailures int

	// ErrorRate trips when failures/attempts over the window reaches it, once
	// the window holds at least MinAttempts attempts. Default 0.5.
	ErrorRate float64
	// MinAttempts is the sample the error rate needs. Default 20.
	MinAttempts int

	// MinUnreachable trips when at least this many attempts got no answer
	// (timeout, refused, TLS, DNS, blocked) in the last RecentWindow, and
	// they are at least UnreachableShare of its attempts. Default 2: a
	// hanging destination yields its first timeouts together (the deliverer
	// keeps two requests in flight to a new destination), and waiting for a
	// third would cost a whole extra timeout period.
	MinUnreachable int
	// RecentWindow is the unreachable rule's span, at most Window.
	// Default 10s.
	RecentWindow time.Duration
	// UnreachableShare is the unreachable rule's share. Default 0.5.
	UnreachableShare float64

	// ThrottledFor trips a destination that has answered only 429 (no 2xx)
	// for this long, with at least MinThrottled 429s. Default 2m.
	ThrottledFor time.Duration
	// MinThrottled is the throttled rule's evidence. Default 3.
	MinThrottled int

	// SlowFraction marks an attempt slow when its latency reaches this share
	// of its timeout. Slow attempts are reported, never a reason to
	// quarantine: a slow 2xx is a delivery. Default 0.8.
	SlowFraction float64

	// ProbeInitial is the wait from quarantine to the first probe.
	// Default 2s.
	ProbeInitial time.Duration
	// ProbeMultiplier multiplies the wait after each failed probe.
	// Default 2.
	ProbeMultiplier float64
	// ProbeMax caps the wait, jitter included. Default 30s, so a destination
	// that heals is probed, and its backlog replayed, well within a minute.
	ProbeMax time.Duration
	// ProbeJitter spreads each wait uniformly by ± this share, so
	// destinations quarantined together are not probed together.
	// Default 0.2.
	ProbeJitter float64
	// ProbeTimeout is how long a probe may stay without result before it
	// counts as failed (the prober may have died with its monitor).
	// Default 30s.
	ProbeTimeout time.Duration
	// FlapCooldown is how long after recovery the probe failures are kept: a
	// destination that trips again while recovering, or within FlapCooldown
	// of becoming healthy, resumes its backoff one step further instead of
	// starting again from ProbeInitial. Default 5m.
	FlapCooldown time.Duration

	// Domain correlates failures across destinations sharing a failure
	// domain.
	Domain DomainPolicy
}

// DomainPolicy says when a failure domain (destinations sharing a network,
// host or DNS zone, named with Machine.SetDomain) is quarantined as a whole.
// When at least MinTripped of a domain's destinations, and at least MinShare
// of those with attempts in the window, trip within Within, the domain trips:
// its other destinations with recent failures are quarantined at once, and
// for Within afterwards any of them is quarantined on its first failure.
// Failures here exclude 429s and permanent 4xx.
type DomainPolicy struct {
	// Enabled turns domain correlation on. Default true.
	Enabled bool
	// MinTripped is the number of destinations that must trip. Default 3.
	MinTripped int
	// MinShare is the share of the domain's active destinations that must
	// trip. Default 0.5.
	MinShare float64
	// Within is the span trips must fall in, and how long a tripped domain
	// stays tripped. Default 30s.
	Within time.Duration
	// MinTenants is how many tenants' destinations must be among the trips
	// before the domain's trip reaches every tenant's destinations there;
	// with fewer, it reaches only the tripping tenants' (judged among their
	// own destinations). Default 2.
	MinTenants int
}

// DefaultPolicy returns the policy the monitor uses unless configured: at
// these values a destination failing one attempt in fifty is never
// quarantined, and one that hangs or refuses every attempt, with outcomes
// arriving every 1-3 s, is quarantined within 10 s of its first failure.
func DefaultPolicy() Policy {
	return Policy{
		Window:              30 * time.Second,
		Bucket:              time.Second,
		ConsecutiveFailures: 5,
		ErrorRate:           0.5,
		MinAttempts:         20,
		MinUnreachable:      2,
		RecentWindow:        10 * time.Second,
		UnreachableShare:    0.5,
		ThrottledFor:        2 * time.Minute,
		MinThrottled:        3,
		SlowFraction:        0.8,
		ProbeInitial:        2 * time.Second,
		ProbeMultiplier:     2,
		ProbeMax:            30 * time.Second,
		ProbeJitter:         0.2,
		ProbeTimeout:        30 * time.Second,
		FlapCooldown:        5 * time.Minute,
		Domain: DomainPolicy{
			Enabled:    true,
			MinTripped: 3,
			MinShare:   0.5,
			Within:     30 * time.Second,
			MinTenants: 2,
		},
	}
}

// maxDelay bounds the policy's durations so sums of times cannot overflow.
const maxDelay = 7 * 24 * time.Hour

// Validate returns every problem of p, each wrapping ErrInvalidPolicy, or
// nil when p can be used.
func (p Policy) Validate() error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("validate: "+format+": %w", append(args, ErrInvalidPolicy)...))
	}
	if err := checkWindow(p.Window, p.Bucket, p.SlowFraction); err != nil {
		errs = append(errs, fmt.Errorf("validate: %w", err))
	}
	if p.Window > maxDelay {
		bad("window %v exceeds %v", p.Window, maxDelay)
	}
	if p.ConsecutiveFailures < 0 {
		bad("consecutive failures %d is negative", p.ConsecutiveFailures)
	}
	if !(p.ErrorRate >= 0 && p.ErrorRate <= 1) {
		bad("error rate %v is not in [0, 1]", p.ErrorRate)
	}
	if p.ErrorRate > 0 && p.MinAttempts < 1 {
		bad("min attempts %d must be at least 1", p.MinAttempts)
	}
	if p.MinUnreachable < 0 {
		bad("min unreachable %d is negative", p.MinUnreachable)
	}
	if p.MinUnreachable > 0 {
		if p.RecentWindow <= 0 || p.RecentWindow > p.Window {
			bad("recent window %v is not in (0, window %v]", p.RecentWindow, p.Window)
		}
		if !(p.UnreachableShare > 0 && p.UnreachableShare <= 1) {
			bad("unreachable share %v is not in (0, 1]", p.UnreachableShare)
		}
	}
	if p.ThrottledFor < 0 || p.ThrottledFor > maxDelay {
		bad("throttled for %v is not in [0, %v]", p.ThrottledFor, maxDelay)
	}
	if p.ThrottledFor > 0 && p.MinThrottled < 1 {
		bad("min throttled %d must be at least 1", p.MinThrottled)
	}
	if p.ProbeInitial <= 0 || p.ProbeMax < p.ProbeInitial || p.ProbeMax > maxDelay {
		bad("probe initial %v and max %v must satisfy 0 < initial <= max <= %v", p.ProbeInitial, p.ProbeMax, maxDelay)
	}
	if !(p.ProbeMultiplier >= 1 && p.ProbeMultiplier <= 1000) {
		bad("probe multiplier %v is not in [1, 1000]", p.ProbeMultiplier)
	}
	if !(p.ProbeJitter >= 0 && p.ProbeJitter < 1) {
		bad("probe jitter %v is not in [0, 1)", p.ProbeJitter)
	}
	if p.ProbeTimeout <= 0 || p.ProbeTimeout > maxDelay {
		bad("probe timeout %v is not in (0, %v]", p.ProbeTimeout, maxDelay)
	}
	if p.FlapCooldown < 0 || p.FlapCooldown > maxDelay {
		bad("flap cooldown %v is not in [0, %v]", p.FlapCooldown, maxDelay)
	}
	if d := p.Domain; d.Enabled {
		if d.MinTripped < 1 {
			bad("domain min tripped %d must be at least 1", d.MinTripped)
		}
		if !(d.MinShare >= 0 && d.MinShare <= 1) {
			bad("domain min share %v is not in [0, 1]", d.MinShare)
		}
		if d.Within <= 0 || d.Within > maxDelay {
			bad("domain within %v is not in (0, %v]", d.Within, maxDelay)
		}
		if d.MinTenants < 1 {
			bad("domain min tenants %d must be at least 1", d.MinTenants)
		}
	}
	return errors.Join(errs...)
}

// Rule names the policy rule that tripped; it suits a metric label.
type Rule string

// The rules of a Policy, in the order Check tries them.
const (
	RuleConsecutive Rule = "consecutive"
	RuleUnreachable Rule = "unreachable"
	RuleErrorRate   Rule = "error_rate"
	RuleThrottled   Rule = "throttled"
)

// Trip is the policy's verdict that a destination must be quarantined.
type Trip struct {
	// Rule is the rule that tripped.
	Rule Rule
	// Reason says why in words, e.g. "5 consecutive timeouts".
	Reason string
}

// Check applies p, which must be valid, to w at now and reports the first
// rule that trips, trying consecutive failures, unreachable, error rate and
// throttled in that order.
func (p Policy) Check(w *Window, now time.Time) (Trip, bool) {
	if p.ConsecutiveFailures > 0 {
		if n := w.Consecutive(now); n >= p.ConsecutiveFailures {
			return Trip{Rule: RuleConsecutive, Reason: consecutiveReason(int64(n), &w.runByClass)}, true
		}
	}
	if p.MinUnreachable > 0 {
		c := w.Recent(now, p.RecentWindow)
		if c.Unreachable >= int64(p.MinUnreachable) && float64(c.Unreachable) >= p.UnreachableShare*float64(c.Attempts) {
			return Trip{Rule: RuleUnreachable, Reason: unreachableReason(c, p.RecentWindow)}, true
		}
	}
	if p.ErrorRate > 0 {
		c := w.Counts(now)
		if c.Attempts >= int64(p.MinAttempts) && c.ErrorRate() >= p.ErrorRate {
			return Trip{Rule: RuleErrorRate, Reason: errorRateReason(c)}, true
		}
	}
	if p.ThrottledFor > 0 {
		if n, since := w.Throttled(now); n >= p.MinThrottled && now.Sub(since) >= p.ThrottledFor {
			return Trip{Rule: RuleThrottled, Reason: fmt.Sprintf(
				"only 429 Too Many Requests for %v (%d attempts without a 2xx)",
				now.Sub(since).Round(time.Second), n)}, true
		}
	}
	return Trip{}, false
}

// ProbeDelay returns the wait before the next probe after failures failed
// probes (0 for the first probe after quarantine): ProbeInitial ×
// ProbeMultiplier^failures, capped at ProbeMax, scaled by 1 ± ProbeJitter
// with r in [0, 1) (0.5 means no jitter), and capped at ProbeMax again, so
// the wait never exceeds ProbeMax. p must be valid.
func (p Policy) ProbeDelay(failures int32, r float64) time.Duration {
	ceiling := float64(p.ProbeMax)
	base := float64(p.ProbeInitial)
	for i := int32(0); i < failures && base < ceiling; i++ {
		base *= p.ProbeMultiplier
	}
	base = min(base, ceiling)
	r = min(max(r, 0), 1)
	d := base * (1 + p.ProbeJitter*(2*r-1))
	return time.Duration(math.Min(d, ceiling))
}

// consecutiveReason says "5 consecutive timeouts", or "5 consecutive
// failures (mostly 5xx responses)" for a mixed run.
func consecutiveReason(n int64, byClass *[classCount]int64) string {
	c, only := dominant(byClass, func(kind) bool { return true })
	if only {
		_, many := classWords(c)
		return fmt.Sprintf("%d consecutive %s", n, many)
	}
	_, many := classWords(c)
	return fmt.Sprintf("%d consecutive failures (mostly %s)", n, many)
}

// unreachableReason says "3 timeouts of 4 attempts in the last 10s".
func unreachableReason(c Counts, span time.Duration) string {
	cls, only := dominant(&c.ByClass, func(k kind) bool { return k == kindUnreachable })
	if only {
		return fmt.Sprintf("%s of %d attempts in the last %v", countOf(c.Unreachable, cls), c.Attempts, span)
	}
	_, many := classWords(cls)
	return fmt.Sprintf("%d attempts without an answer of %d in the last %v (mostly %s)", c.Unreachable, c.Attempts, span, many)
}

// errorRateReason says "error rate 62% over 24 attempts (mostly 5xx
// responses)".
func errorRateReason(c Counts) string {
	cls, _ := dominant(&c.ByClass, func(k kind) bool {
		return k == kindFailure || k == kindUnreachable || k == kindClient
	})
	_, many := classWords(cls)
	return fmt.Sprintf("error rate %d%% over %d attempts (mostly %s)",
		int(math.Floor(100*c.ErrorRate())), c.Attempts, many)
}

// failureClass reports whether an error class is a failure for the
// consecutive run and the domain rules.
func failureClass(c eventv1.ErrorClass) bool {
	k := kindOf(classOf(c))
	return k == kindFailure || k == kindUnreachable
}
