// Package stall tells when a destination's DELIVERY backlog stops moving:
// batches wait, yet no delivery attempt is made and none is parked. That is a
// fault of Bulkhead (a lane that lost its pull, a deliverer that is down),
// not of the customer's endpoint, so it never feeds quarantine; it is shown
// to operators, measured and alarmed instead.
package stall

import (
	"errors"
	"fmt"
	"sort"
	"time"
)

// ErrInvalidConfig is wrapped by New for a configuration it cannot use.
var ErrInvalidConfig = errors.New("invalid stall configuration")

// Tracker follows each destination's backlog and delivery activity. It is
// not safe for concurrent use.
type Tracker struct {
	after time.Duration
	dests map[string]*state
	// resumed collects destinations an attempt un-stalled since the last
	// Update, which reports them.
	resumed []string
}

// state is what the tracker knows of one destination.
type state struct {
	backlog  int64
	progress time.Time // last attempt, shrink of the backlog, or empty backlog
	since    time.Time // when it was first found stalled; zero while not
	seen     bool      // in the latest backlog snapshot
}

// New returns a tracker that calls a backlog stalled once it has not moved
// for after (at least; see Update).
func New(after time.Duration) (*Tracker, error) {
	if after <= 0 {
		return nil, fmt.Errorf("stall after %v must be positive: %w", after, ErrInvalidConfig)
	}
	return &Tracker{after: after, dests: map[string]*state{}}, nil
}

// Attempt records a delivery attempt's outcome for dest at t: delivery is
// moving, whatever the answer.
func (tr *Tracker) Attempt(dest string, t time.Time) {
	s := tr.get(dest, t)
	if t.After(s.progress) {
		s.progress = t
	}
	if !s.since.IsZero() {
		s.since = time.Time{}
		tr.resumed = append(tr.resumed, dest)
	}
}

// Update takes a snapshot of every destination's backlog (batches waiting in
// DELIVERY, pulled or not) at now. A destination absent from backlog has
// none. patience gives the least time a destination may go without progress
// before it counts as stalled (its request timeout makes attempts rarer);
// the tracker uses the larger of it and its own. It returns the
// destinations that became stalled and those that stopped being stalled in
// this update, each sorted.
func (tr *Tracker) Update(now time.Time, backlog map[string]int64, patience func(dest string) time.Duration) (stalled, resumed []string) {
	resumed, tr.resumed = tr.resumed, nil
	for _, s := range tr.dests {
		s.seen = false
	}
	for dest, n := range backlog {
		if n <= 0 {
			continue
		}
		s := tr.get(dest, now)
		s.seen = true
		if n < s.backlog {
			s.progress = now
		}
		s.backlog = n
		wait := tr.after
		if patience != nil {
			wait = max(wait, patience(dest))
		}
		if s.since.IsZero() && now.Sub(s.progress) >= wait {
			s.since = now
			stalled = append(stalled, dest)
		}
	}
	for dest, s := range tr.dests {
		if s.seen {
			continue
		}
		// An empty backlog is progress: it has all gone somewhere.
		if !s.since.IsZero() {
			resumed = append(resumed, dest)
		}
		delete(tr.dests, dest)
	}
	sort.Strings(stalled)
	sort.Strings(resumed)
	return stalled, resumed
}

// Since returns when dest was found stalled, or the zero time while it is
// not stalled.
func (tr *Tracker) Since(dest string) time.Time {
	if s := tr.dests[dest]; s != nil {
		return s.since
	}
	return time.Time{}
}

// Stalled returns the number of stalled destinations.
func (tr *Tracker) Stalled() int {
	n := 0
	for _, s := range tr.dests {
		if !s.since.IsZero() {
			n++
		}
	}
	return n
}

// Forget drops a deleted destination.
func (tr *Tracker) Forget(dest string) { delete(tr.dests, dest) }

// get returns dest's state, creating it as having progressed at t: a
// backlog first seen now has had no chance to stall yet.
func (tr *Tracker) get(dest string, t time.Time) *state {
	s := tr.dests[dest]
	if s == nil {
		s = &state{progress: t}
		tr.dests[dest] = s
	}
	return s
}
