package scenario

import (
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bulkhead-io/bulkhead/e2e/internal/fleet"
	"github.com/bulkhead-io/bulkhead/e2e/internal/report"
)

// bitset is a fixed-size set of small integers, safe for concurrent use.
type bitset []atomic.Uint64

func newBitset(n int) bitset { return make(bitset, (n+63)/64) }

// set adds i and reports whether it was already present.
func (b bitset) set(i int) bool {
	m := uint64(1) << (i % 64)
	return b[i/64].Or(m)&m != 0
}

func (b bitset) has(i int) bool { return b[i/64].Load()&(uint64(1)<<(i%64)) != 0 }

// tracker knows every impression of a run by its key
// "<prefix>-<dest>-<tick>-<j>" and records which were accepted, delivered
// and parked, and each first delivery's latency from its scheduled submit
// time. Memory is three bits per scheduled impression plus the recorder's
// histograms.
type tracker struct {
	cfg    Config
	prefix string
	system string
	start  time.Time
	rec    *report.Recorder
	class  []report.Class // per destination
	per    int            // bit slots per tick per destination

	accepted, delivered, parked []bitset // per destination

	nAccepted, nDelivered, nDup, nBad atomic.Int64
	lastArrival                       atomic.Int64 // unix nanos
	// backlogLast is, per failing destination, the latest arrival of an
	// impression scheduled before the heal (unix nanos).
	backlogLast []atomic.Int64
	healOffset  time.Duration

	live liveStats
}

func newTracker(cfg Config, system, prefix string, failing []fleet.Behavior, rec *report.Recorder) *tracker {
	t := &tracker{
		cfg: cfg, system: system, prefix: prefix, rec: rec,
		class:       make([]report.Class, cfg.Destinations),
		per:         cfg.perTenantMax(),
		backlogLast: make([]atomic.Int64, cfg.Destinations),
		healOffset:  cfg.HealAt(),
	}
	n := cfg.ticks() * t.per
	for i := range cfg.Destinations {
		if failing[i] != fleet.Healthy {
			t.class[i] = report.Failing
		}
		t.accepted = append(t.accepted, newBitset(n))
		t.delivered = append(t.delivered, newBitset(n))
		t.parked = append(t.parked, newBitset(n))
	}
	return t
}

// key names impression j of destination i's batch at tick k.
func (t *tracker) key(i, k, j int) string {
	b := make([]byte, 0, len(t.prefix)+24)
	b = append(b, t.prefix...)
	b = append(b, '-')
	b = strconv.AppendInt(b, int64(i), 10)
	b = append(b, '-')
	b = strconv.AppendInt(b, int64(k), 10)
	b = append(b, '-')
	b = strconv.AppendInt(b, int64(j), 10)
	return string(b)
}

// parse inverts key; ok is false for a key this run did not make.
func (t *tracker) parse(key string) (i, k, j int, ok bool) {
	rest, found := strings.CutPrefix(key, t.prefix+"-")
	if !found {
		return 0, 0, 0, false
	}
	var nums [3]int
	for n := range 3 {
		field := rest
		if n < 2 {
			var cut bool
			field, rest, cut = strings.Cut(rest, "-")
			if !cut {
				return 0, 0, 0, false
			}
		}
		v, err := strconv.Atoi(field)
		if err != nil || v < 0 {
			return 0, 0, 0, false
		}
		nums[n] = v
	}
	i, k, j = nums[0], nums[1], nums[2]
	if i >= t.cfg.Destinations || k >= t.cfg.ticks() || j >= t.per {
		return 0, 0, 0, false
	}
	return i, k, j, true
}

func (t *tracker) slot(k, j int) int { return k*t.per + j }

// accept records tenant i's batch at tick k of n impressions as accepted.
func (t *tracker) accept(i, k, n int) {
	for j := range n {
		t.accepted[i].set(t.slot(k, j))
	}
	t.nAccepted.Add(int64(n))
}

// arrival records a 2xx from the fleet: first deliveries get a latency
// sample, repeats count as duplicates.
func (t *tracker) arrival(a fleet.Arrival) {
	at := a.At.UnixNano()
	for {
		last := t.lastArrival.Load()
		if at <= last || t.lastArrival.CompareAndSwap(last, at) {
			break
		}
	}
	for _, key := range a.Keys {
		i, k, j, ok := t.parse(key)
		if !ok || i != a.Endpoint {
			t.nBad.Add(1)
			continue
		}
		if t.delivered[i].set(t.slot(k, j)) {
			t.nDup.Add(1)
			continue
		}
		t.nDelivered.Add(1)
		off := t.cfg.offset(i, k)
		lat := a.At.Sub(t.start.Add(off))
		t.rec.Record(report.Sample{
			System: t.system, Phase: t.cfg.PhaseAt(off), Class: t.class[i],
			Second: int(off / time.Second), Latency: lat,
		})
		if off < t.healOffset && t.class[i] == report.Failing {
			for {
				last := t.backlogLast[i].Load()
				if at <= last || t.backlogLast[i].CompareAndSwap(last, at) {
					break
				}
			}
		}
		t.live.record(t.class[i], lat)
	}
}

// park records a key found in PARKED; it reports whether the key was known.
func (t *tracker) park(key string) bool {
	i, k, j, ok := t.parse(key)
	if !ok {
		return false
	}
	t.parked[i].set(t.slot(k, j))
	return true
}

// counts are the accounting of a finished run, in distinct impressions.
type counts struct {
	accepted, delivered, parkedOnly, parkedAll, lost int64
	// parkedFailing counts distinct parked impressions of failing
	// destinations (delivered later or not).
	parkedFailing int64
	// undrained lists failing destinations with accepted impressions
	// scheduled before the heal that were never delivered.
	undrained map[int]bool
}

func (t *tracker) count() counts {
	c := counts{undrained: map[int]bool{}}
	healTick := int(t.healOffset / t.cfg.Interval)
	for i := range t.cfg.Destinations {
		for s := range t.cfg.ticks() * t.per {
			if !t.accepted[i].has(s) {
				continue
			}
			c.accepted++
			d, p := t.delivered[i].has(s), t.parked[i].has(s)
			switch {
			case d:
				c.delivered++
			case p:
				c.parkedOnly++
			default:
				c.lost++
			}
			if p {
				c.parkedAll++
				if t.class[i] == report.Failing {
					c.parkedFailing++
				}
			}
			if !d && t.class[i] == report.Failing && s/t.per < healTick {
				c.undrained[i] = true
			}
		}
	}
	return c
}

// liveStats is what arrived since the last snapshot, per class, for the
// demo's one line per second.
type liveStats struct {
	mu   sync.Mutex
	hist [2]report.Histogram
}

func (l *liveStats) record(c report.Class, lat time.Duration) {
	l.mu.Lock()
	l.hist[c].Record(lat)
	l.mu.Unlock()
}

// take returns and resets the per-class histograms.
func (l *liveStats) take() [2]report.Histogram {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := l.hist
	l.hist = [2]report.Histogram{}
	return out
}
