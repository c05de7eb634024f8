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
}

// New returns a replayer for the destinations of view; call Run.
func New(ctx context.Context, js jetstream.JetStream, view *registry.Registry, cfg Config, log *slog.Logger, reg prometheus.Registerer) (*Replayer, error) {
	kv, err := js.KeyValue(ctx, topology.BucketLeases)
	if err != nil {
		return nil, err
	}
	r := &Replayer{
		js: js, leases: kv, view: view, cfg: cfg, log: log, running: map[string]bool{},
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
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-sub.Ready():
			for _, c := range sub.Take() {
				if c.Kind == registry.DecisionChanged && !c.Deleted && c.Decision.GetState() == eventv1.State_STATE_RECOVERING {
					r.begin(ctx, c.ID)
				}
			}
		}
	}
}

// begin starts dest's replay unless one is running.
func (r *Replayer) begin(ctx context.Context, dest string) {
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
		r.replay(ctx, dest)
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
func (r *Replayer) replay(ctx context.Context, dest string) {
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
					r.move(ctx, dest)
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
func (r *Replayer) move(ctx context.Context, dest string) {
	for attempt := 0; ; attempt++ {
		start := time.Now()
		b, n, err := parked.Replay(ctx, r.js, dest, parked.ReplayOptions{
			Rate: r.cfg.Rate, MaxRate: r.cfg.MaxRate, RampEvery: r.cfg.RampEvery,
			Continue: func() bool { return ctx.Err() == nil && r.mayReplay(dest) },
			Shared:   r.shared,
		})
		r.batches.WithLabelValues(dest).Add(float64(b))
		if err == nil || ctx.Err() != nil {
			r.log.Info("replay done", "destination", dest, "batches", b, "impressions", n, "took", time.Since(start))
			return
		}
		r.log.Error("replay interrupted; retrying", "destination", dest, "batches", b, "err", err)
		if !lifecycle.Sleep(ctx, lifecycle.Backoff(attempt, time.Second, 30*time.Second)) {
			return
		}
	}
}
