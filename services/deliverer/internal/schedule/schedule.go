// Package schedule shares one pool of delivery workers fairly across
// destinations and tenants, and caps how many workers any one destination may
// hold, so that a failing destination never slows a healthy one.
//
// Each destination is a lane: a FIFO of ready batches and an adaptive
// in-flight cap (AIMD). A worker asks Next for work; the scheduler picks a
// tenant, then a lane of that tenant, each by deficit round robin weighted by
// impressions and by the worker time each ticket held, among the lanes that
// have a batch queued and a free slot, of tenants below their in-flight
// bound. A black-holed destination therefore holds at most its cap of
// workers (cut to MinCap by Sweep once its requests hang, and as they time
// out), a slow one is served less often and its cap shrinks, a tenant holds
// at most TenantMaxInFlight workers however many destinations it has, and a
// destination with a deep backlog gets its share per round, no more,
// however short the queue of the others.
//
// Two levels instead of one DRR over lanes because tenants own very different
// numbers of destinations: with a single level, a tenant with 500 destinations
// would get 500 times the capacity of a tenant with one.
package schedule

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// ErrClosed is returned by Push and Next once the scheduler is closed.
var ErrClosed = errors.New("scheduler closed")

// ErrLaneFull is returned by Push when the lane already holds Config.MaxQueued
// items: the caller should stop taking messages for that destination until
// the lane drains (backpressure to the consumer).
var ErrLaneFull = errors.New("lane full")

// ErrTenantMismatch is returned by Push for an existing lane with a different
// tenant.
var ErrTenantMismatch = errors.New("lane belongs to another tenant")

// ErrInvalidConfig is wrapped by Config.Validate and New for a config that
// cannot be used.
var ErrInvalidConfig = errors.New("invalid scheduler config")

// Config tunes a Scheduler. Zero fields take the value of DefaultConfig.
type Config struct {
	// Quantum is the impressions credited per round to each tenant, and to
	// each lane within its tenant. Set it near the size of a typical batch:
	// smaller is finer-grained, larger makes fewer passes per pick.
	Quantum int
	// MaxQueued is the most items a lane holds queued (not counting in-flight
	// ones) before Push returns ErrLaneFull.
	MaxQueued int
	// MinCap, InitialCap and MaxCap bound a lane's in-flight cap and set the
	// cap of a new lane.
	MinCap, InitialCap, MaxCap int
	// TenantMaxInFlight bounds the tickets of one tenant's lanes in flight
	// together, so one tenant's many slow destinations cannot hold the
	// whole pool; 0 means no bound.
	TenantMaxInFlight int
	// TimeQuantum is the worker time charged as one Quantum of impressions:
	// a ticket held longer than it costs its lane and tenant that much more
	// in the round robin, so a destination that holds workers for seconds
	// is served less often, not as often as a fast one.
	TimeQuantum time.Duration
	// HangAfter and HangFactor say when a lane's requests count as hanging:
	// its oldest ticket in flight is older than HangAfter and HangFactor
	// times the lane's usual time to an answer. Sweep then cuts the lane's
	// cap to MinCap at once, well before the requests time out.
	HangAfter  time.Duration
	HangFactor float64
}

// DefaultConfig returns the scheduler's defaults: quantum 500 impressions, 64
// queued items per lane, in-flight cap starting at 2 within [1, 8].
func DefaultConfig() Config {
	return Config{Quantum: 500, MaxQueued: 64, MinCap: 1, InitialCap: 2, MaxCap: 8,
		TimeQuantum: 100 * time.Millisecond, HangAfter: 2 * time.Second, HangFactor: 4}
}

// withDefaults returns c with its zero fields set from DefaultConfig.
func (c Config) withDefaults() Config {
	d := DefaultConfig()
	for _, f := range []struct{ v, def *int }{
		{&c.Quantum, &d.Quantum}, {&c.MaxQueued, &d.MaxQueued},
		{&c.MinCap, &d.MinCap}, {&c.InitialCap, &d.InitialCap}, {&c.MaxCap, &d.MaxCap},
	} {
		if *f.v == 0 {
			*f.v = *f.def
		}
	}
	if c.TimeQuantum == 0 {
		c.TimeQuantum = d.TimeQuantum
	}
	if c.HangAfter == 0 {
		c.HangAfter = d.HangAfter
	}
	if c.HangFactor == 0 {
		c.HangFactor = d.HangFactor
	}
	return c
}

// Validate returns an error wrapping ErrInvalidConfig when c, with its zero
// fields defaulted, cannot be used.
func (c Config) Validate() error {
	c = c.withDefaults()
	var problem string
	switch {
	case c.Quantum < 1:
		problem = fmt.Sprintf("quantum %d must be at least 1", c.Quantum)
	case c.MaxQueued < 1:
		problem = fmt.Sprintf("max queued %d must be at least 1", c.MaxQueued)
	case c.MinCap < 1:
		problem = fmt.Sprintf("min cap %d must be at least 1", c.MinCap)
	case c.MaxCap < c.MinCap:
		problem = fmt.Sprintf("max cap %d must be at least min cap %d", c.MaxCap, c.MinCap)
	case c.InitialCap < c.MinCap || c.InitialCap > c.MaxCap:
		problem = fmt.Sprintf("initial cap %d must be in [%d, %d]", c.InitialCap, c.MinCap, c.MaxCap)
	case c.TenantMaxInFlight < 0:
		problem = fmt.Sprintf("tenant max in flight %d must not be negative", c.TenantMaxInFlight)
	case c.TimeQuantum < 0 || c.HangAfter < 0 || c.HangFactor < 1:
		problem = "time quantum and hang-after must not be negative, hang factor at least 1"
	default:
		return nil
	}
	return fmt.Errorf("validate: %s: %w", problem, ErrInvalidConfig)
}

// maxQuanta bounds the cost charged for one item, in quanta, so that a pick
// skips at most that many rounds of the lanes in debt; an item costing more is
// charged maxQuanta quanta.
const maxQuanta = 64

// Result is the outcome of a dispatched item, reported to Done. It adapts the
// lane's in-flight cap.
type Result int

const (
	// Neutral leaves the cap alone: the attempt says nothing about the
	// destination's capacity (a permanent 4xx, a batch that was cancelled).
	// It is the zero Result.
	Neutral Result = iota
	// OK counts towards growing the cap: the destination answered 2xx.
	OK
	// Failure halves the cap: the destination is unreachable or overloaded (a
	// timeout, a connection error, a 5xx, a 429).
	Failure
	// Slow halves the cap too: the destination answered 2xx, but so close
	// to its timeout that more requests in flight would only hold more
	// workers (a slow destination is never quarantined, so this is what
	// bounds it).
	Slow
)

// Ticket is an item handed to a worker by Next. Pass it back to Done exactly
// once.
type Ticket[T any] struct {
	// Lane and Tenant identify the lane the item came from.
	Lane, Tenant string
	// Item is the item as pushed.
	Item T
	// Cost is the cost as pushed.
	Cost int

	lane  *queue[T]
	id    uint64
	start time.Time
}

// Stats is a snapshot of one lane.
type Stats struct {
	// Queued is the number of items waiting in the lane.
	Queued int
	// InFlight is the number of tickets of the lane not yet Done.
	InFlight int
	// Cap is the lane's current in-flight cap.
	Cap int
	// Usual is the lane's usual time to an answer (a moving average of its
	// successes); 0 before the first.
	Usual time.Duration
}

// entry is a queued item.
type entry[T any] struct {
	item T
	cost int
}

// queue is one destination's place in the scheduler (the deliverer's lane
// feeds it): its queued items and in-flight accounting. It is linked in its
// tenant's ring exactly when it is ready: it has a queued item and a free
// slot.
type queue[T any] struct {
	id       string
	tenant   *tenant[T]
	queue    fifo[entry[T]]
	inflight int
	cap      int
	// streak counts successes since the cap last changed.
	streak  int
	removed bool
	link    link[*queue[T]]
	// started holds when each ticket in flight was handed out, by id; usual
	// is the moving average of successful tickets' time.
	started map[uint64]time.Time
	usual   time.Duration
}

func (l *queue[T]) links() *link[*queue[T]] { return &l.link }

func (l *queue[T]) ready() bool {
	return !l.removed && l.queue.len() > 0 && l.inflight < l.cap
}

// tenant groups the lanes of one tenant. It is linked in the scheduler's ring
// exactly when one of its lanes is ready.
type tenant[T any] struct {
	id       string
	lanes    ring[*queue[T]] // ready lanes
	count    int             // all lanes
	inflight int             // tickets of its lanes in flight
	link     link[*tenant[T]]
}

func (t *tenant[T]) links() *link[*tenant[T]] { return &t.link }

// Scheduler hands the items of many lanes to a pool of workers, fairly and
// within each lane's in-flight cap. It is safe for concurrent use. Every
// operation is O(1) amortised, whatever the number of lanes, apart from Drain
// and Remove, which are linear in the items they return.
type Scheduler[T any] struct {
	cfg Config

	mu      sync.Mutex
	cond    sync.Cond // signalled, with mu held, when an item may have become ready, and on Close
	lanes   map[string]*queue[T]
	tenants map[string]*tenant[T]
	active  ring[*tenant[T]] // tenants with a ready lane
	waiting int              // Next calls blocked in cond.Wait
	closed  bool
	// busy are the lanes with tickets in flight, for Sweep.
	busy   map[*queue[T]]struct{}
	nextID uint64
	now    func() time.Time
}

// New returns a scheduler, or an error wrapping ErrInvalidConfig.
func New[T any](cfg Config) (*Scheduler[T], error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("new scheduler: %w", err)
	}
	s := &Scheduler[T]{
		cfg:     cfg.withDefaults(),
		lanes:   make(map[string]*queue[T]),
		tenants: make(map[string]*tenant[T]),
		busy:    make(map[*queue[T]]struct{}),
		now:     time.Now,
	}
	s.cond.L = &s.mu
	return s, nil
}

// Push queues item at the back of lane, creating the lane (for tenant) if
// needed. cost is the item's weight for fairness, its number of impressions;
// values below 1 count as 1. It returns ErrLaneFull when the lane already
// holds MaxQueued items, ErrTenantMismatch when the lane exists for another
// tenant, and ErrClosed after Close; the item is not queued then.
func (s *Scheduler[T]) Push(lane, tenant string, item T, cost int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	l := s.lanes[lane]
	switch {
	case l == nil:
		l = s.newLane(lane, tenant)
	case l.tenant.id != tenant:
		return fmt.Errorf("push %s for tenant %s: %w", lane, tenant, ErrTenantMismatch)
	case l.queue.len() >= s.cfg.MaxQueued:
		return ErrLaneFull
	}
	l.queue.push(entry[T]{item: item, cost: max(cost, 1)})
	if s.update(l) {
		s.cond.Signal()
	}
	return nil
}

// Lock must be held.
func (s *Scheduler[T]) newLane(id, tenantID string) *queue[T] {
	t := s.tenants[tenantID]
	if t == nil {
		t = &tenant[T]{id: tenantID}
		s.tenants[tenantID] = t
	}
	t.count++
	l := &queue[T]{id: id, tenant: t, cap: s.cfg.InitialCap, started: map[uint64]time.Time{}}
	s.lanes[id] = l
	return l
}

// update links or unlinks l, and its tenant, to match whether l is ready
// and the tenant may send (a ready lane, below its in-flight bound), and
// reports whether l can be picked now. Lock must be held.
func (s *Scheduler[T]) update(l *queue[T]) bool {
	t := l.tenant
	ready := l.ready()
	switch {
	case ready && !l.link.linked:
		t.lanes.push(l)
	case !ready && l.link.linked:
		t.lanes.remove(l)
	}
	active := t.lanes.n > 0 && (s.cfg.TenantMaxInFlight == 0 || t.inflight < s.cfg.TenantMaxInFlight)
	switch {
	case active && !t.link.linked:
		s.active.push(t)
	case !active && t.link.linked:
		s.active.remove(t)
	}
	return ready && active
}

// Next blocks until an item is ready in a lane below its in-flight cap, then
// dequeues it, counts it in flight and returns its ticket. Among the ready
// lanes it picks a tenant, then a lane of that tenant, by deficit round robin
// over impressions; within a lane, items come out in the order pushed. It
// returns ErrClosed once the scheduler is closed, and the context's error when
// ctx ends first.
func (s *Scheduler[T]) Next(ctx context.Context) (Ticket[T], error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	registered := false
	for {
		if s.closed {
			return Ticket[T]{}, ErrClosed
		}
		if err := ctx.Err(); err != nil {
			// A Signal meant for this caller must not be lost: pass it on.
			if s.active.n > 0 {
				s.cond.Signal()
			}
			return Ticket[T]{}, err
		}
		if s.active.n > 0 {
			t := s.pick()
			// Wake another worker if more is ready, so that one Signal per
			// ready item is never needed for the pool to keep up.
			if s.active.n > 0 && s.waiting > 0 {
				s.cond.Signal()
			}
			return t, nil
		}
		if !registered && ctx.Done() != nil {
			registered = true
			// Wake every waiter when ctx ends; each checks its own context.
			// Broadcasting under the lock means a waiter either sees the
			// error before waiting or is already waiting.
			stop := context.AfterFunc(ctx, func() {
				s.mu.Lock()
				s.cond.Broadcast()
				s.mu.Unlock()
			})
			defer stop()
		}
		s.waiting++
		s.cond.Wait()
		s.waiting--
	}
}

// pick dequeues the next item by two-level DRR. A tenant must be active. Lock
// must be held.
func (s *Scheduler[T]) pick() Ticket[T] {
	t := s.active.pick(s.cfg.Quantum)
	l := t.lanes.pick(s.cfg.Quantum)
	e := l.queue.pop()
	l.inflight++
	t.inflight++
	s.nextID++
	id, start := s.nextID, s.now()
	l.started[id] = start
	s.busy[l] = struct{}{}

	s.charge(l, min(e.cost, maxQuanta*s.cfg.Quantum))
	s.update(l) // unlinks l if it is now empty or at its cap, t at its bound
	return Ticket[T]{Lane: l.id, Tenant: t.id, Item: e.item, Cost: e.cost, lane: l, id: id, start: start}
}

// charge debits cost from l and its tenant, keeping each debt within
// maxQuanta quanta, and ends their visits if they have spent their credit.
// Lock must be held.
func (s *Scheduler[T]) charge(l *queue[T], cost int) {
	t := l.tenant
	floor := -maxQuanta * s.cfg.Quantum
	l.link.deficit = max(l.link.deficit-cost, floor)
	t.link.deficit = max(t.link.deficit-cost, floor)
	t.lanes.settle(l)
	s.active.settle(t)
}

// Done ends a ticket handed out by Next and adapts its lane's cap to r (AIMD):
// OK adds one to the cap after cap consecutive OKs, up to MaxCap; Failure
// halves it, down to MinCap. Every failure halves, not one per round trip as
// TCP does, so that a destination that black-holes a full cap of requests
// drops to MinCap when they time out rather than one timeout period at a time:
// isolation matters more here than the throughput of a flaky destination.
// Done on a ticket whose lane was removed does nothing.
func (s *Scheduler[T]) Done(t Ticket[T], r Result) {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := t.lane
	if l == nil {
		return
	}
	if _, ok := l.started[t.id]; !ok {
		return // done already, or its lane was removed
	}
	delete(l.started, t.id)
	l.inflight--
	l.tenant.inflight--
	if l.inflight == 0 {
		delete(s.busy, l)
	}
	held := s.now().Sub(t.start)
	if s.cfg.TimeQuantum > 0 {
		// Worker time beyond the first quantum is charged as impressions.
		if extra := int(held/s.cfg.TimeQuantum) * s.cfg.Quantum; extra > 0 {
			s.charge(l, min(extra, maxQuanta*s.cfg.Quantum))
		}
	}
	switch r {
	case OK:
		l.usual = usual(l.usual, held)
		l.streak++
		if l.streak >= l.cap {
			l.cap = min(l.cap+1, s.cfg.MaxCap)
			l.streak = 0
		}
	case Slow:
		l.usual = usual(l.usual, held)
		l.cap = max(l.cap/2, s.cfg.MinCap)
		l.streak = 0
	case Failure:
		l.cap = max(l.cap/2, s.cfg.MinCap)
		l.streak = 0
	}
	if l.removed {
		return
	}
	if s.update(l) || l.tenant.link.linked {
		s.cond.Signal()
	}
}

// usual folds one more success of duration d into the moving average u.
func usual(u, d time.Duration) time.Duration {
	if u == 0 {
		return d
	}
	return (4*u + d) / 5
}

// Sweep cuts to MinCap the cap of every lane whose oldest ticket in flight
// has waited longer than HangAfter and HangFactor times the lane's usual
// time to an answer, and returns those lanes: a destination that stops
// answering holds one worker within seconds instead of its whole cap until
// its requests time out. The deliverer calls it a few times a second.
func (s *Scheduler[T]) Sweep() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	var hung []string
	for l := range s.busy {
		if l.cap <= s.cfg.MinCap {
			continue
		}
		patience := max(s.cfg.HangAfter, time.Duration(s.cfg.HangFactor*float64(l.usual)))
		for _, at := range l.started {
			if now.Sub(at) > patience {
				l.cap, l.streak = s.cfg.MinCap, 0
				s.update(l)
				hung = append(hung, l.id)
				break
			}
		}
	}
	return hung
}

// Drain removes and returns the items queued in lane, oldest first, leaving
// its in-flight items, its cap and the lane itself in place. The deliverer
// uses it when a destination is quarantined, to park what has not been sent.
// It returns nil for an unknown lane.
func (s *Scheduler[T]) Drain(lane string) []T {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.lanes[lane]
	if l == nil {
		return nil
	}
	items := s.drain(l)
	s.update(l)
	return items
}

// Lock must be held.
func (s *Scheduler[T]) drain(l *queue[T]) []T {
	if l.queue.len() == 0 {
		return nil
	}
	items := make([]T, 0, l.queue.len())
	for l.queue.len() > 0 {
		items = append(items, l.queue.pop().item)
	}
	return items
}

// Remove deletes lane and returns its queued items, oldest first, so the
// caller can park them rather than lose them. Tickets of the lane still in
// flight stay valid for the caller, and their Done does nothing; a later Push
// creates the lane anew with the initial cap.
func (s *Scheduler[T]) Remove(lane string) []T {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.lanes[lane]
	if l == nil {
		return nil
	}
	items := s.drain(l)
	l.removed = true
	s.update(l)
	delete(s.lanes, lane)
	delete(s.busy, l)
	t := l.tenant
	// Its tickets in flight no longer count against the tenant; their Done
	// does nothing.
	t.inflight -= len(l.started)
	l.started = map[uint64]time.Time{}
	l.inflight = 0
	s.update(l)
	t.count--
	if t.count == 0 {
		delete(s.tenants, t.id)
	}
	return items
}

// Stats returns a snapshot of lane, and false when there is no such lane.
func (s *Scheduler[T]) Stats(lane string) (Stats, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.lanes[lane]
	if l == nil {
		return Stats{}, false
	}
	return Stats{Queued: l.queue.len(), InFlight: l.inflight, Cap: l.cap, Usual: l.usual}, true
}

// Close makes Push and Next return ErrClosed and wakes every blocked Next.
// Queued items stay until drained or removed; Done still works. Close may be
// called more than once.
func (s *Scheduler[T]) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	s.cond.Broadcast()
}
