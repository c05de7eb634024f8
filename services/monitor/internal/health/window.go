package health

import (
	"fmt"
	"math"
	"time"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
)

const (
	// maxBuckets bounds a Window's memory whatever its configuration.
	maxBuckets = 3600
	// histSlots is how many latency histograms share a Window's span: one
	// per sixth of it, since quantiles are for display and need no
	// bucket-level precision.
	histSlots = 6
	// latencyOctaves and latencySubBins shape the latency histogram: 4
	// linear bins per doubling from 1 ms to 2^17 ms (131 s), so a reported
	// quantile is within 12.5% of the truth, plus one bin below 1 ms and one
	// above 131 s.
	latencyOctaves = 17
	latencySubBins = 4
	latencyBins    = 1 + latencyOctaves*latencySubBins + 1
)

// Counts is what a Window counted over part of its span.
type Counts struct {
	// Attempts is every attempt, whatever its outcome.
	Attempts int64
	// Successes got a 2xx.
	Successes int64
	// Failures is every failed attempt except 429s: the error rate's
	// numerator. It includes Client.
	Failures int64
	// Unreachable failed without an HTTP answer: TIMEOUT, CONNECT, TLS, DNS
	// or BLOCKED. They are included in Failures.
	Unreachable int64
	// Client got a permanent 4xx (CLIENT); included in Failures.
	Client int64
	// Throttled got a 429 (THROTTLED); not included in Failures.
	Throttled int64
	// Slow took at least the Window's slow fraction of their timeout,
	// whatever their outcome.
	Slow int64
	// ByClass counts attempts by eventv1.ErrorClass; index 0 (UNSPECIFIED)
	// is Successes.
	ByClass [classCount]int64
}

// ErrorRate is Failures/Attempts, 0 without attempts. A 429 is an attempt
// but not a failure, so throttling lowers the error rate: a destination that
// answers is alive.
func (c Counts) ErrorRate() float64 {
	if c.Attempts == 0 {
		return 0
	}
	return float64(c.Failures) / float64(c.Attempts)
}

// hardFailures are the failures that say something about the endpoint
// rather than the payload: Failures without Client.
func (c Counts) hardFailures() int64 { return c.Failures - c.Client }

// Window is one destination's sliding time window of delivery outcomes.
//
// Counters live in a ring of buckets (1 s each at the defaults) covering the
// span, so memory is fixed whatever the traffic: at the defaults about 2 KB of
// counters and 2 KB of latency histograms. Latencies go into log-linear
// histograms, one per sixth of the span, so quantiles cover between the span
// and 7/6 of it. Beyond the ring, a Window follows the current run of
// consecutive failures, the current run of 429s and the last success; a run
// is broken by a success or by a silence longer than the span (for 429s,
// longer than twice the last Retry-After when that is longer).
//
// A Window never reads the clock: every time is passed in. It is not safe for
// concurrent use.
type Window struct {
	span         time.Duration
	width        int64 // bucket width in nanoseconds
	slowFraction float64
	buckets      []bucket
	histSpan     int64 // buckets per latency histogram
	hists        []latencyHist

	run         int64 // consecutive failures (kindFailure, kindUnreachable)
	runByClass  [classCount]int64
	lastFailure time.Time
	lastSuccess time.Time

	throttled      int64 // consecutive 429s without a success
	throttledSince time.Time
	lastThrottled  time.Time
	retryAfter     time.Duration // of the last 429
}

// bucket counts the attempts that finished in one bucket-wide slice of time.
type bucket struct {
	idx      int64 // absolute index: UnixNano / width; math.MinInt64 when empty
	attempts uint32
	slow     uint32
	byClass  [classCount]uint32
}

// latencyHist counts latencies over histSpan buckets.
type latencyHist struct {
	idx    int64 // absolute index: bucket index / histSpan; math.MinInt64 when empty
	counts [latencyBins]uint32
}

// NewWindow returns an empty window covering span in buckets of the given
// width; span must be a positive multiple of bucket, at most 3600 buckets.
// An attempt is slow when its latency is at least slowFraction (in (0, 1])
// of its timeout. It returns an error wrapping ErrInvalidPolicy otherwise.
func NewWindow(span, bucket time.Duration, slowFraction float64) (*Window, error) {
	if err := checkWindow(span, bucket, slowFraction); err != nil {
		return nil, fmt.Errorf("new window: %w", err)
	}
	return newWindow(span, bucket, slowFraction), nil
}

// checkWindow returns an error wrapping ErrInvalidPolicy when NewWindow
// cannot use its arguments.
func checkWindow(span, bucket time.Duration, slowFraction float64) error {
	switch {
	case bucket <= 0 || span <= 0 || span%bucket != 0:
		return fmt.Errorf("window %v is not a positive multiple of bucket %v: %w", span, bucket, ErrInvalidPolicy)
	case span/bucket > maxBuckets:
		return fmt.Errorf("window %v holds more than %d buckets of %v: %w", span, maxBuckets, bucket, ErrInvalidPolicy)
	case !(slowFraction > 0 && slowFraction <= 1):
		return fmt.Errorf("slow fraction %v is not in (0, 1]: %w", slowFraction, ErrInvalidPolicy)
	}
	return nil
}

// newWindow is NewWindow for arguments checkWindow accepted.
func newWindow(span, width time.Duration, slowFraction float64) *Window {
	n := int64(span / width)
	histSpan := max(1, (n+histSlots-1)/histSlots)
	w := &Window{
		span:         span,
		width:        int64(width),
		slowFraction: slowFraction,
		buckets:      make([]bucket, n),
		histSpan:     histSpan,
		// The span overlaps at most ceil(n/histSpan)+1 histograms.
		hists: make([]latencyHist, (n+histSpan-1)/histSpan+1),
	}
	w.Reset()
	return w
}

// Reset forgets every outcome and run, but not the last success.
func (w *Window) Reset() {
	for i := range w.buckets {
		w.buckets[i] = bucket{idx: math.MinInt64}
	}
	for i := range w.hists {
		w.hists[i] = latencyHist{idx: math.MinInt64}
	}
	w.run = 0
	clear(w.runByClass[:])
	w.lastFailure = time.Time{}
	w.throttled = 0
	w.throttledSince, w.lastThrottled, w.retryAfter = time.Time{}, time.Time{}, 0
}

// Add records the outcome of an attempt that finished at at. An outcome a
// span or more older than outcomes already recorded may be dropped, as its
// bucket was reused. Runs follow the order of Add calls.
func (w *Window) Add(o *eventv1.Outcome, at time.Time) {
	idx := floorDiv(at.UnixNano(), w.width)
	b := w.bucket(idx)
	if b == nil {
		return
	}
	class := classOf(o.GetErrorClass())
	b.attempts++
	b.byClass[class]++
	// lat > 0 is false for NaN too.
	if lat := o.GetLatencyMs(); lat > 0 && !math.IsInf(lat, 1) {
		if h := w.hist(floorDiv(idx, w.histSpan)); h != nil {
			h.counts[latencyBin(lat)]++
		}
		if to := o.GetTimeoutMs(); to > 0 && lat >= w.slowFraction*to {
			b.slow++
		}
	}
	w.follow(class, time.Duration(o.GetRetryAfterMs())*time.Millisecond, at)
}

// follow updates the runs that outlive the buckets.
func (w *Window) follow(class eventv1.ErrorClass, retryAfter time.Duration, at time.Time) {
	switch kindOf(class) {
	case kindSuccess:
		w.run = 0
		clear(w.runByClass[:])
		w.throttled = 0
		if at.After(w.lastSuccess) {
			w.lastSuccess = at
		}
	case kindFailure, kindUnreachable:
		if w.run > 0 && at.Sub(w.lastFailure) > w.span {
			w.run = 0
			clear(w.runByClass[:])
		}
		w.run++
		w.runByClass[class]++
		if at.After(w.lastFailure) {
			w.lastFailure = at
		}
	case kindThrottled:
		if w.throttled > 0 && at.Sub(w.lastThrottled) > w.throttleGap() {
			w.throttled = 0
		}
		if w.throttled == 0 {
			w.throttledSince = at
		}
		w.throttled++
		if at.After(w.lastThrottled) {
			w.lastThrottled = at
		}
		w.retryAfter = retryAfter
	case kindClient:
		// A permanent 4xx neither extends nor breaks a run: the endpoint
		// answered, but the batch it rejected says nothing about the others.
	}
}

// throttleGap is the silence that ends a run of 429s.
func (w *Window) throttleGap() time.Duration {
	return max(w.span, 2*w.retryAfter)
}

// bucket returns the ring slot for absolute index idx, emptied if it held an
// older index, or nil when it holds a newer one (idx is out of the window).
func (w *Window) bucket(idx int64) *bucket {
	b := &w.buckets[floorMod(idx, int64(len(w.buckets)))]
	switch {
	case b.idx == idx:
		return b
	case b.idx > idx:
		return nil
	}
	*b = bucket{idx: idx}
	return b
}

// hist is bucket for latency histograms.
func (w *Window) hist(idx int64) *latencyHist {
	h := &w.hists[floorMod(idx, int64(len(w.hists)))]
	switch {
	case h.idx == idx:
		return h
	case h.idx > idx:
		return nil
	}
	*h = latencyHist{idx: idx}
	return h
}

// Counts sums the whole span ending at now.
func (w *Window) Counts(now time.Time) Counts {
	return w.Recent(now, w.span)
}

// Recent sums the buckets of the last d (rounded up to whole buckets, at
// most the span) ending at now.
func (w *Window) Recent(now time.Time, d time.Duration) Counts {
	k := min(int64(len(w.buckets)), max(1, (int64(d)+w.width-1)/w.width))
	hi := floorDiv(now.UnixNano(), w.width)
	lo := hi - k
	var c Counts
	for i := range w.buckets {
		b := &w.buckets[i]
		if b.idx <= lo || b.idx > hi {
			continue
		}
		c.Attempts += int64(b.attempts)
		c.Slow += int64(b.slow)
		for cls, n := range b.byClass {
			c.ByClass[cls] += int64(n)
		}
	}
	for cls, n := range c.ByClass {
		switch kindOf(eventv1.ErrorClass(cls)) {
		case kindSuccess:
			c.Successes += n
		case kindFailure:
			c.Failures += n
		case kindUnreachable:
			c.Failures += n
			c.Unreachable += n
		case kindClient:
			c.Failures += n
			c.Client += n
		case kindThrottled:
			c.Throttled += n
		}
	}
	return c
}

// Consecutive returns the current run of failures at now: failures (429s and
// permanent 4xx excepted) since the last success, or 0 when the last of them
// is older than the span.
func (w *Window) Consecutive(now time.Time) int {
	if w.run == 0 || now.Sub(w.lastFailure) > w.span {
		return 0
	}
	return int(w.run)
}

// Throttled returns the current run of 429s at now and when it began: 429s
// since the last success, or 0 when the run was broken by silence.
func (w *Window) Throttled(now time.Time) (n int, since time.Time) {
	if w.throttled == 0 || now.Sub(w.lastThrottled) > w.throttleGap() {
		return 0, time.Time{}
	}
	return int(w.throttled), w.throttledSince
}

// LastSuccess is when the last 2xx recorded finished; zero if none was.
func (w *Window) LastSuccess() time.Time { return w.lastSuccess }

// Latency returns the q-quantile (0 < q ≤ 1) in milliseconds of the latencies
// recorded over the span ending at now, or 0 when none were.
func (w *Window) Latency(now time.Time, q float64) float64 {
	hi := floorDiv(now.UnixNano(), w.width)
	lo := hi - int64(len(w.buckets)) // exclusive, in buckets
	var sum [latencyBins]uint64
	var total uint64
	for i := range w.hists {
		h := &w.hists[i]
		first, last := h.idx*w.histSpan, h.idx*w.histSpan+w.histSpan-1
		if h.idx == math.MinInt64 || last <= lo || first > hi {
			continue
		}
		for bin, n := range h.counts {
			sum[bin] += uint64(n)
			total += uint64(n)
		}
	}
	if total == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(total)))
	rank = min(max(rank, 1), total)
	var seen uint64
	for bin, n := range sum {
		seen += n
		if seen >= rank {
			return binValue(bin)
		}
	}
	return binValue(latencyBins - 1)
}

// latencyBin returns the histogram bin of a positive latency in ms.
func latencyBin(ms float64) int {
	if ms < 1 {
		return 0
	}
	frac, exp := math.Frexp(ms) // ms = frac·2^exp, frac in [0.5, 1)
	octave := exp - 1
	if octave >= latencyOctaves {
		return latencyBins - 1
	}
	sub := int((2*frac - 1) * latencySubBins)
	return 1 + octave*latencySubBins + sub
}

// binValue is the latency in ms that stands for a bin: its midpoint, 0.5 ms
// below 1 ms, and the lower bound for the overflow bin.
func binValue(bin int) float64 {
	switch bin {
	case 0:
		return 0.5
	case latencyBins - 1:
		return math.Ldexp(1, latencyOctaves)
	}
	octave, sub := (bin-1)/latencySubBins, (bin-1)%latencySubBins
	return math.Ldexp(1+(float64(sub)+0.5)/latencySubBins, octave)
}

// floorDiv divides rounding toward minus infinity, so times before 1970
// still index the ring correctly; b must be positive.
func floorDiv(a, b int64) int64 {
	q := a / b
	if a%b < 0 {
		q--
	}
	return q
}

// floorMod is the non-negative remainder matching floorDiv.
func floorMod(a, b int64) int64 {
	m := a % b
	if m < 0 {
		m += b
	}
	return m
}
