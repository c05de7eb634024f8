// Package retry decides how long a failed delivery waits before its next
// attempt and when a batch has used up its retries and must be parked.
package retry

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"time"
)

// ErrInvalidPolicy is wrapped by Policy.Validate for a policy that cannot be
// used.
var ErrInvalidPolicy = errors.New("invalid retry policy")

// Policy bounds the retries of one batch. The zero value is not valid; start
// from DefaultPolicy.
type Policy struct {
	// Base is the smallest delay between attempts and the unit of the
	// exponential backoff.
	Base time.Duration
	// Max caps the backoff delay (not a Retry-After, see RetryAfterCap).
	Max time.Duration
	// MaxAttempts is the number of attempts, the first included, after which
	// the batch is parked.
	MaxAttempts int
	// MaxAge is how long after its first attempt a batch may still be tried.
	MaxAge time.Duration
	// RetryAfterCap caps a destination's Retry-After, so a hostile or broken
	// header cannot hold a batch for days.
	RetryAfterCap time.Duration
}

// DefaultPolicy returns the policy the deliverer uses unless configured:
// 250ms base, 30s cap, 12 attempts, 15 minutes, Retry-After capped at 1h.
func DefaultPolicy() Policy {
	return Policy{
		Base:          250 * time.Millisecond,
		Max:           30 * time.Second,
		MaxAttempts:   12,
		MaxAge:        15 * time.Minute,
		RetryAfterCap: time.Hour,
	}
}

// maxDelay bounds every duration of a Policy so that doubling and adding
// jitter can never overflow.
const maxDelay = 7 * 24 * time.Hour

// Validate returns an error wrapping ErrInvalidPolicy when p cannot be used.
func (p Policy) Validate() error {
	var problem string
	switch {
	case p.Base <= 0:
		problem = fmt.Sprintf("base %v must be positive", p.Base)
	case p.Max < p.Base:
		problem = fmt.Sprintf("max %v must be at least base %v", p.Max, p.Base)
	case p.Max > maxDelay:
		problem = fmt.Sprintf("max %v must be at most %v", p.Max, maxDelay)
	case p.MaxAttempts < 1:
		problem = fmt.Sprintf("max attempts %d must be at least 1", p.MaxAttempts)
	case p.MaxAge <= 0:
		problem = fmt.Sprintf("max age %v must be positive", p.MaxAge)
	case p.RetryAfterCap < 0 || p.RetryAfterCap > maxDelay:
		problem = fmt.Sprintf("retry-after cap %v must be in [0, %v]", p.RetryAfterCap, maxDelay)
	default:
		return nil
	}
	return fmt.Errorf("validate: %s: %w", problem, ErrInvalidPolicy)
}

// Delay returns how long to wait after failed attempt number attempt (1 after
// the first failure; values below 1 count as 1) before trying again. p must be
// valid.
//
// The backoff uses "equal jitter": with ceiling c = min(Max, Base·2^attempt),
// the delay is uniform in [c/2, c], then raised to at least Base. Equal jitter
// rather than full jitter because full jitter's range starts at zero, and a
// near-zero delay against a destination that is failing is a hot retry loop;
// equal jitter keeps half the spread while guaranteeing the floor. So without a
// Retry-After the delay is always in [Base, Max]: 250ms–500ms after the first
// failure, 15s–30s once the cap is reached.
//
// When the destination sent Retry-After (retryAfter > 0), the delay is at
// least min(retryAfter, RetryAfterCap). If that wins over the backoff, up to
// a tenth of it is added as jitter so that batches told to wait the same time
// do not all return in the same instant.
//
// rnd returns a number in [0, 1), like rand.Float64 (used when rnd is nil);
// values outside are clamped. Tests pass a fixed function.
func (p Policy) Delay(attempt int, retryAfter time.Duration, rnd func() float64) time.Duration {
	if rnd == nil {
		rnd = rand.Float64
	}
	r := clamp01(rnd())

	// c doubles from 2·Base while below Max; the loop ends within
	// log2(Max/Base) steps and never overflows because Max <= maxDelay.
	c := 2 * p.Base
	for i := 1; i < attempt && c < p.Max; i++ {
		c *= 2
	}
	c = min(c, p.Max)
	d := max(c/2+time.Duration(r*float64(c/2)), p.Base)
	d = min(d, p.Max)

	if retryAfter > 0 {
		ra := min(retryAfter, p.RetryAfterCap)
		if ra > d {
			d = ra + time.Duration(r*float64(ra/10))
		}
	}
	return d
}

// Exhausted reports whether a batch that has made attempt attempts, the first
// at firstAttempt, may not be tried again at now and must be parked. A caller
// that knows the next delay can pass now+delay to park at once instead of
// waiting for an attempt that would come too late.
func (p Policy) Exhausted(attempt int, firstAttempt, now time.Time) bool {
	return attempt >= p.MaxAttempts || now.Sub(firstAttempt) >= p.MaxAge
}

// clamp01 maps r into [0, 1), treating NaN as 0.
func clamp01(r float64) float64 {
	switch {
	case r >= 0 && r < 1:
		return r
	case r >= 1:
		return 1 - 1e-9
	default: // negative or NaN
		return 0
	}
}
