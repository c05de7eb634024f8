// Package recovery replays a destination's parked backlog into delivery when
// the health monitor decides it is RECOVERING: oldest first, at a bounded rate
// that ramps up, stopping at once if the destination fails or is paused again.
package recovery

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
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/subject"
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

// Manager starts and stops replays as decisions change. Of several router
// replicas, the one holding the lease "replay-<dest>" replays that destination.
type Manager struct {
	js      jetstream.JetStream
	leases  jetstream.KeyValue
	cfg     Config
	log     *slog.Logger
	state   func(id string) eventv1.State
	batches *prometheus.CounterVec
	shared  *rate.Limiter

	mu      sync.Mutex
	ctx     context.Context
	running map[string]context.CancelFunc
	closed  bool // set by Wait; no replay starts after it
	wg      sync.WaitGroup
}

// New returns a manager; state gives a destination's current state.
func New(ctx context.Context, js jetstream.JetStream, cfg Config, log *slog.Logger, reg prometheus.Registerer) (*Manager, error) {
	kv, err := js.KeyValue(ctx, subject.BucketLeases)
	if err != nil {
		return nil, err
	}
	m := &Manager{
		js: js, leases: kv, cfg: cfg, log: log, running: map[string]context.CancelFunc{},
		shared: rate.NewLimiter(rate.Limit(cfg.TotalRate), max(1, int(cfg.TotalRate/10))),
		batches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bulkhead_router_replayed_batches_total", Help: "Parked batches replayed into delivery, by destination.",
		}, []string{"destination"}),
	}
	return m, reg.Register(m.batches)
}

// Start lets OnChange start replays, under ctx, reading states from reg. It
// also starts replays for destinations already RECOVERING.
func (m *Manager) Start(ctx context.Context, state func(string) eventv1.State, recovering []string) {
	m.mu.Lock()
	m.ctx, m.state = ctx, state
	m.mu.Unlock()
	for _, id := range recovering {
		m.begin(id)
	}
}

// OnChange is the registry callback: a RECOVERING decision starts a replay.
func (m *Manager) OnChange(c registry.Change) {
	if c.Kind == registry.DecisionChanged && !c.Deleted && c.Decision.GetState() == eventv1.State_STATE_RECOVERING {
		m.begin(c.ID)
	}
}

func (m *Manager) begin(dest string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed || m.ctx == nil || m.ctx.Err() != nil {
		return
	}
	if _, ok := m.running[dest]; ok {
		return
	}
	ctx, cancel := context.WithCancel(m.ctx)
	m.running[dest] = cancel
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer func() {
			m.mu.Lock()
			delete(m.running, dest)
			m.mu.Unlock()
			cancel()
		}()
		m.replay(ctx, cancel, dest)
	}()
}

// replay waits out the grace period, then replays while holding the lease.
func (m *Manager) replay(ctx context.Context, done context.CancelFunc, dest string) {
	select {
	case <-ctx.Done():
		return
	case <-time.After(parked.ReplayGrace):
	}
	recovering := func() bool {
		s := m.state(dest)
		return s == eventv1.State_STATE_RECOVERING || s == eventv1.State_STATE_HEALTHY
	}
	if !recovering() {
		return
	}
	var replays sync.WaitGroup
	lease.Run(ctx, m.leases, "replay-"+dest, m.cfg.Holder, time.Second, m.log, func(held bool) {
		if !held {
			return
		}
		replays.Add(1)
		go func() {
			defer replays.Done()
			// Ends the lease (and so this replay) once the backlog is moved.
			defer done()
			// A failed replay (DELIVERY full, NATS away) is retried: the
			// destination stays RECOVERING until its backlog is moved.
			for attempt := 0; ; attempt++ {
				start := time.Now()
				b, n, err := parked.Replay(ctx, m.js, dest, parked.ReplayOptions{
					Rate: m.cfg.Rate, MaxRate: m.cfg.MaxRate, RampEvery: m.cfg.RampEvery,
					Continue: func() bool { return ctx.Err() == nil && recovering() },
					Shared:   m.shared,
				})
				m.batches.WithLabelValues(dest).Add(float64(b))
				if err == nil || ctx.Err() != nil {
					m.log.Info("replay done", "destination", dest, "batches", b, "impressions", n, "took", time.Since(start))
					return
				}
				m.log.Error("replay interrupted; retrying", "destination", dest, "batches", b, "err", err)
				select {
				case <-ctx.Done():
					return
				case <-time.After(min(time.Second<<min(attempt, 5), 30*time.Second)):
				}
			}
		}()
	})
	replays.Wait()
}

// Wait blocks until every replay has stopped (after the Start context ends).
// No replay starts after Wait is called, so the WaitGroup's Add never races
// its Wait.
func (m *Manager) Wait() {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	m.wg.Wait()
}
