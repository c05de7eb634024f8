// Package report records benchmark latencies in bounded memory and writes the
// benchmark's results as Markdown, JSON and a PNG chart.
package report

import (
	"math"
	"math/bits"
	"time"
)

// The histogram is log-linear, like HdrHistogram: values below 2^subBits
// are counted exactly; above, each power of two [2^k, 2^(k+1)) is split
// into 2^subBits equal buckets, so a bucket is at most 1/128 of its lower
// bound wide. Quantiles return the bucket's midpoint clamped to the observed
// min and max: relative error at most 1/256 (≈0.4%).
const (
	subBits   = 7
	subCount  = 1 << subBits // buckets per group
	numGroups = 64 - subBits // enough for any non-negative int64
)

// Histogram counts durations in log-linear buckets with at most 0.4%
// relative error per quantile. Buckets are allocated 128 at a time (1 KiB)
// for each power of two actually seen, so a histogram of latencies within
// a few orders of magnitude takes a few KiB. The zero value is empty and
// ready; a Histogram is not safe for concurrent use.
type Histogram struct {
	// groups[0] counts values [0, 128) exactly; groups[g], g >= 1, counts
	// [2^(g+6), 2^(g+7)) in buckets 2^(g-1) wide.
	groups   [numGroups]*[subCount]uint64
	n        uint64
	min, max int64
	sum      float64
}

// locate returns the group and bucket of v >= 0.
func locate(v int64) (g, i int) {
	if v < subCount {
		return 0, int(v)
	}
	k := bits.Len64(uint64(v)) - 1 // v in [2^k, 2^(k+1)), k >= subBits
	g = k - subBits + 1
	return g, int(v>>(g-1)) - subCount
}

// bucketMid returns the midpoint of bucket i of group g.
func bucketMid(g, i int) int64 {
	if g == 0 {
		return int64(i)
	}
	lo := int64(subCount+i) << (g - 1)
	width := int64(1) << (g - 1)
	return lo + (width-1)/2
}

// Record adds one duration; negative durations count as 0.
func (h *Histogram) Record(d time.Duration) {
	v := max(int64(d), 0)
	g, i := locate(v)
	if h.groups[g] == nil {
		h.groups[g] = new([subCount]uint64)
	}
	h.groups[g][i]++
	if h.n == 0 || v < h.min {
		h.min = v
	}
	if v > h.max {
		h.max = v
	}
	h.n++
	h.sum += float64(v)
}

// Merge adds every count of o to h.
func (h *Histogram) Merge(o *Histogram) {
	if o == nil || o.n == 0 {
		return
	}
	for g, grp := range o.groups {
		if grp == nil {
			continue
		}
		if h.groups[g] == nil {
			h.groups[g] = new([subCount]uint64)
		}
		for i, c := range grp {
			h.groups[g][i] += c
		}
	}
	if h.n == 0 || o.min < h.min {
		h.min = o.min
	}
	h.max = max(h.max, o.max)
	h.n += o.n
	h.sum += o.sum
}

// Count returns the number of recorded durations.
func (h *Histogram) Count() uint64 { return h.n }

// Min returns the smallest recorded duration, exactly (0 when empty).
func (h *Histogram) Min() time.Duration { return time.Duration(h.min) }

// Max returns the largest recorded duration, exactly (0 when empty).
func (h *Histogram) Max() time.Duration { return time.Duration(h.max) }

// Mean returns the mean of the recorded durations (0 when empty).
func (h *Histogram) Mean() time.Duration {
	if h.n == 0 {
		return 0
	}
	return time.Duration(h.sum / float64(h.n))
}

// Quantile returns the q-quantile (q in [0, 1]) by nearest rank: the value
// below or at which ceil(q·n) of the durations lie, within 0.4%. Quantile(0)
// is Min and Quantile(1) is Max, exactly. It returns 0 when empty.
func (h *Histogram) Quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	switch {
	case rank <= 1 || math.IsNaN(q):
		return time.Duration(h.min)
	case rank >= h.n:
		return time.Duration(h.max)
	}
	var seen uint64
	for g, grp := range h.groups {
		if grp == nil {
			continue
		}
		for i, c := range grp {
			if seen += c; seen >= rank {
				return time.Duration(min(max(bucketMid(g, i), h.min), h.max))
			}
		}
	}
	return time.Duration(h.max)
}

// Latency summarises the histogram in milliseconds.
func (h *Histogram) Latency() Latency {
	return Latency{
		Count:  h.n,
		MinMs:  ms(h.Min()),
		MeanMs: ms(h.Mean()),
		P50Ms:  ms(h.Quantile(0.50)),
		P95Ms:  ms(h.Quantile(0.95)),
		P99Ms:  ms(h.Quantile(0.99)),
		MaxMs:  ms(h.Max()),
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
