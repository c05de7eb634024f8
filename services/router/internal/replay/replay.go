// Package replay moves a destination's parked backlog back into delivery
// when the health monitor decides it is RECOVERING: oldest first, at a
// bounded rate that ramps up, stopping at once if the destination fails, is
// paused again or is deleted.
package replay

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/lease"
	"github.com/bulkhead-io/bulkhead/pkg/lifecycle"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

// Config shapes replays.
type Config struct {
	// Rate is the starting replay rate in batches per second.
	Rate float64
	// MaxRate is where the ramp stops.
	MaxRate float64
	// RampEvery doubles the rate at this interval.
	RampEvery time.Duration
	// TotalRate caps all replays of this replica together, batches per
	// second, so many destinations recovering at once (a regional outage
	// healing) cannot flood delivery for everyone else.
	TotalRate float64
	// Holder names this replica in the replay leases.
	Holder string
}

// Replayer starts and stops replays as decisions change. Of several router
// replicas, the one holding the lease "replay-<dest>" replays that
// destination, and it replays it once: losing the lease stops the replay.
type Replayer struct {
	js      jetstream.JetStream
	leases  jetstream.KeyValue
	view    *registry.Registry
	cfg     Config
	log     *slog.Logger
	batches *prometheus.CounterVec
	shared  *rate.Limiter

	group   lifecycle.Group
	mu      sync.Mutex
	running map[string]bool // destinations with a replay goroutine
	// overflowed are destinations with batches parked because their DELIVERY
	// backlog was at its budget (parked.OverBudget): sweepOverflow replays
	// those once the backlog is down to half the budget.
	overflowed map[string]bool
}

// New returns a replayer for the destinations of view; call Run.
func New(ctx context.Context, js jetstream.JetStream, view *registry.Registry, cfg Config, log *slog.Logger, reg prometheus.Registerer) (*Replayer, error) {
	kv, err := js.KeyValue(ctx, topology.BucketLeases)
	if err != nil {
		return nil, err
	}
	r := &Replayer{
		js: js, leases: kv, view: view, cfg: cfg, log: log, running: map[string]bool{}, overflowed: map[string]bool{},
		shared: rate.NewLimiter(rate.Limit(cfg.TotalRate), max(1, int(cfg.TotalRate/10))),
		batches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bulkhead_router_replayed_batches_total", Help: "Parked batches replayed into delivery, by destination.",
		}, []string{"destination"}),
	}
	return r, reg.Register(r.batches)
}

// Run starts a replay for every RECOVERING decision, those already stored
// included, until ctx ends; then it waits for every replay to stop.
func (r *Replayer) Run(ctx context.Context) error {
	sub := r.view.Subscribe() // starts with every decision in force
	defer sub.Close()
	defer r.group.Stop()
	// Batches parked over budget before this replica started (by it, before
	// a restart, or by another) are found once: every destination with
	// parked data is looked through on the first sweep.
	r.group.Go(func() {
		r.overflowedAtStart(ctx)
		lifecycle.Every(ctx, overflowSweep, r.sweepOverflow)
	})
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-sub.Ready():
			for _, c := range sub.Take() {
				if c.Kind == registry.DecisionChanged && !c.Deleted && c.Decision.GetState() == eventv1.State_STATE_RECOVERING {
					r.begin(ctx, c.ID, nil)
				}
			}
		}
	}
}

// overflowSweep is how often destinations with batches parked over budget
// are checked for room in DELIVERY.
const overflowSweep = 5 * time.Second

// Overflowed records that a batch of dest was parked because its DELIVERY
// backlog was at its budget; the router calls it as it parks one.
func (r *Replayer) Overflowed(dest string) {
	r.mu.Lock()
	r.overflowed[dest] = true
	r.mu.Unlock()
}

// overflowedAtStart marks every destination with parked data, so the first
// sweeps look through them for batches parked over budget.
func (r *Replayer) overflowedAtStart(ctx context.Context) {
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	// The counts alone (one request): parked.Summary would also read each
	// destination's oldest batch.
	st, err := r.js.Stream(sctx, topology.StreamParked)
	if err != nil {
		r.log.Warn("look for batches parked over budget", "err", err)
		return
	}
	sh, err := stream.PerSubject(sctx, st, topology.AllParked)
	if err != nil {
		r.log.Warn("look for batches parked over budget", "err", err)
		return
	}
	for id := range sh.ByID {
		r.Overflowed(id)
	}
}

// sweepOverflow replays, for each destination marked Overflowed that may
// receive traffic and whose DELIVERY backlog is at most half its budget,
// the batches parked over budget (and only those); the body of a loop.
func (r *Replayer) sweepOverflow(ctx context.Context) {
	r.mu.Lock()
	var due []string
	for id := range r.overflowed {
		if !r.running[id] {
			due = append(due, id)
		}
	}
	r.mu.Unlock()
	if len(due) == 0 {
		return
	}
	st, err := r.js.Stream(ctx, topology.StreamDelivery)
	if err != nil {
		return
	}
	for _, id := range due {
		if d := r.view.Destination(id); d == nil {
			r.forget(id) // deleted: its parked data stays exportable
			continue
		} else if _, held := registry.Hold(d, r.view.State(id)); held {
			continue // its hold's own replay moves everything later
		}
		subj, _ := topology.Deliver(id)
		sh, err := stream.PerSubject(ctx, st, subj)
		if err != nil || sh.PerSubjectLimit > 0 && sh.ByID[id] > sh.PerSubjectLimit/2 {
			continue
		}
		r.forget(id) // parking over budget again marks it again
		r.begin(ctx, id, overBudget)
	}
}

func (r *Replayer) forget(dest string) {
	r.mu.Lock()
	delete(r.overflowed, dest)
	r.mu.Unlock()
}

// overBudget picks the batches parked because DELIVERY was full for them.
func overBudget(b *eventv1.Batch) bool { return b.GetParkReason() == parked.OverBudget.String() }

// begin starts dest's replay of the parked batches only picks (nil: all)
// unless one is running.
func (r *Replayer) begin(ctx context.Context, dest string, only func(*eventv1.Batch) bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.running[dest] {
		return
	}
	if r.group.Go(func() {
		defer func() {
			r.mu.Lock()
			delete(r.running, dest)
			r.mu.Unlock()
		}()
		r.replay(ctx, dest, only)
	}) {
		r.running[dest] = true
	}
}

// mayReplay reports whether dest's parked backlog may move to delivery now:
// it exists and is RECOVERING (or already HEALTHY again).
func (r *Replayer) mayReplay(dest string) bool {
	if r.view.Destination(dest) == nil {
		return false // deleted: its parked data stays exportable
	}
	s := r.view.State(dest)
	return s == eventv1.State_STATE_RECOVERING || s == eventv1.State_STATE_HEALTHY
}

// replay waits out the grace period, then competes for dest's lease and
// replays while it holds it. Losing the lease stops the replay at once;
// the replay ending (the backlog moved) gives the lease up.
func (r *Replayer) replay(ctx context.Context, dest string, only func(*eventv1.Batch) bool) {
	if !lifecycle.Sleep(ctx, parked.ReplayGrace) || !r.mayReplay(dest) {
		return
	}
	key, err := topology.LeaseReplay(dest)
	if err != nil {
		return
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	elector := lease.Elect(ctx, r.leases, key, r.cfg.Holder, time.Second, r.log)
	defer elector.Stop()
	var worker *lifecycle.Handle
	defer func() {
		if worker != nil {
			_ = worker.Stop()
		}
	}()
	for {
		var done <-chan struct{}
		if worker != nil {
			done = worker.Done()
		}
		select {
		case held, ok := <-elector.Changes():
			switch {
			case held && ok && worker == nil:
				worker = lifecycle.Start(ctx, func(ctx context.Context) error {
					r.move(ctx, dest, only)
					return nil
				})
			case (!held || !ok) && worker != nil:
				_ = worker.Stop() // lost the lease: another replica may take over
				worker = nil
			}
			if !ok {
				return
			}
		case <-done:
			return // moved: the deferred Stop gives the lease up
		}
	}
}

// move replays dest's parked backlog, retrying a failed replay (DELIVERY
// full, NATS away): the destination stays RECOVERING until it is moved.
func (r *Replayer) move(ctx context.Context, dest string, only func(*eventv1.Batch) bool) {
	for attempt := 0; ; attempt++ {
		start := time.Now()
		b, n, err := parked.Replay(ctx, r.js, dest, parked.ReplayOptions{
			Rate: r.cfg.Rate, MaxRate: r.cfg.MaxRate, RampEvery: r.cfg.RampEvery,
			Continue: func() bool { return ctx.Err() == nil && r.mayReplay(dest) },
			Shared:   r.shared,
			Only:     only,
		})
		r.batches.WithLabelValues(dest).Add(float64(b))
		if err == nil || ctx.Err() != nil {
			r.log.Info("replay done", "destination", dest, "batches", b, "impressions", n, "took", time.Since(start))
			return
		}
		if stream.IsSubjectFull(err) && only != nil {
			// A replay of batches parked over budget yields to fresh
			// traffic: it stops here, and the sweep starts it again once
			// the backlog is down to half the budget.
			r.log.Info("replay of batches parked over budget paused: DELIVERY budget full again", "destination", dest, "batches", b)
			r.Overflowed(dest)
			return
		}
		r.log.Error("replay interrupted; retrying", "destination", dest, "batches", b, "err", err)
		if !lifecycle.Sleep(ctx, lifecycle.Backoff(attempt, time.Second, 30*time.Second)) {
			return
		}
	}
}
