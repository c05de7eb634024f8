// Package deliver runs the deliverer: one JetStream consumer and one lane per
// destination, a shared worker pool scheduled fairly across lanes, signed
// webhook POSTs, retries that never hold a worker, and parking of what cannot
// or must not be delivered. Messages are acknowledged only after a 2xx or
// after they are stored in PARKED (invariant 1).
package deliver

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	"github.com/bulkhead-io/bulkhead/pkg/lifecycle"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/bulkhead-io/bulkhead/pkg/webhook"
	"github.com/bulkhead-io/bulkhead/services/deliverer/internal/batch"
	"github.com/bulkhead-io/bulkhead/services/deliverer/internal/retry"
	"github.com/bulkhead-io/bulkhead/services/deliverer/internal/schedule"
)

// Config tunes the deliverer.
type Config struct {
	// Workers is the size of the shared pool of POSTing workers.
	Workers int
	// Schedule tunes fairness and the adaptive per-destination in-flight cap.
	Schedule schedule.Config
	// Retry bounds retries of one batch before it is parked.
	Retry retry.Policy
	// AckWait is the redelivery timeout of the per-destination consumers;
	// held messages are kept alive with progress acks well within it.
	AckWait time.Duration
	// MaxAckPending bounds the messages one destination holds unacknowledged.
	MaxAckPending int
	// LaneMaxBytes bounds the bytes of the messages one destination's lane
	// owns (pulled, not yet acknowledged): at it, the lane stops taking
	// messages, which stay in DELIVERY. 0: DefaultLaneMaxBytes.
	LaneMaxBytes int
	// RetryShare is the share of Workers that retries may occupy at once, so
	// retries of failing destinations never crowd out fresh traffic.
	RetryShare float64
	// ReplayShare is the share of Workers that replayed batches (parked
	// backlogs moving back after a recovery) may occupy at once, so many
	// destinations recovering together never crowd out fresh traffic.
	// 0: DefaultReplayShare.
	ReplayShare float64
	// LagInterval is how often each lane's consumer is read for the lag
	// gauges and the starving check (see checkStarving); 5 s when zero.
	LagInterval time.Duration
	// OrphanInterval is how often DELIVERY is searched for the backlog of
	// destinations that no longer exist (see adoptOrphans); 30 s when zero.
	OrphanInterval time.Duration
}

// DefaultReplayShare is the share of the workers replays may use at once.
const DefaultReplayShare = 0.25

// DefaultLaneMaxBytes is a lane's byte budget unless configured: a few
// POSTs' worth of full batches, so a failing destination waiting out its
// backoff holds little memory, whatever its backlog.
const DefaultLaneMaxBytes = 16 << 20

// Deliverer is the running delivery engine.
type Deliverer struct {
	js      jetstream.JetStream
	cfg     Config
	client  *webhook.Client
	log     *slog.Logger
	metrics *metrics
	sched   *schedule.Scheduler[*job]
	view    *registry.Registry
	// retrying counts workers busy with a retry (see RetryShare), replaying
	// those busy with a replayed batch (ReplayShare).
	retrying  atomic.Int64
	replaying atomic.Int64
	// group owns every goroutine and retry timer of the deliverer: workers,
	// lanes, parking, the keep-alive and lag loops.
	group lifecycle.Group

	mu    sync.Mutex
	lanes map[string]*lane
}

// New returns a deliverer serving the destinations of view; call Run.
func New(js jetstream.JetStream, view *registry.Registry, client *webhook.Client, cfg Config, log *slog.Logger, reg prometheus.Registerer) (*Deliverer, error) {
	if err := cfg.Retry.Validate(); err != nil {
		return nil, err
	}
	if cfg.LagInterval <= 0 {
		cfg.LagInterval = 5 * time.Second
	}
	if cfg.ReplayShare <= 0 {
		cfg.ReplayShare = DefaultReplayShare
	}
	if cfg.LaneMaxBytes <= 0 {
		cfg.LaneMaxBytes = DefaultLaneMaxBytes
	}
	if cfg.OrphanInterval <= 0 {
		cfg.OrphanInterval = 30 * time.Second
	}
	if cfg.Schedule.TenantMaxInFlight == 0 {
		// A quarter of the pool: however many slow destinations a tenant
		// has, three quarters stay for the others. Never below two full
		// destination caps, so a small pool is not split finer than that.
		cfg.Schedule.TenantMaxInFlight = max(2*cmp.Or(cfg.Schedule.MaxCap, schedule.DefaultConfig().MaxCap), cfg.Workers/4)
	}
	sched, err := schedule.New[*job](cfg.Schedule)
	if err != nil {
		return nil, err
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	return &Deliverer{js: js, cfg: cfg, client: client, log: log, metrics: m, sched: sched, view: view, lanes: map[string]*lane{}}, nil
}

// apply handles one registry change: it creates, updates, holds, releases
// and removes lanes. Only Run calls it.
func (d *Deliverer) apply(ctx context.Context, c registry.Change) {
	d.mu.Lock()
	defer d.mu.Unlock()
	l := d.lanes[c.ID]
	switch c.Kind {
	case registry.DestinationChanged:
		if c.Deleted {
			if l != nil {
				l.setDeleted()
			}
			return
		}
		if l != nil {
			l.setDestination(c.Destination)
			return
		}
		l = newLane(d, c.Destination)
		l.setDecision(d.view.Decision(c.ID))
		if !d.group.Go(func() { d.runLane(ctx, l) }) {
			return // shutting down
		}
		d.lanes[c.ID] = l
	case registry.DecisionChanged:
		if l != nil {
			l.setDecision(c.Decision)
		}
	}
}

// runLane runs a lane until it ends; a lane that ended because its
// destination was deleted leaves the list, one that stopped for shutdown
// stays so Run can hand its messages back.
func (d *Deliverer) runLane(ctx context.Context, l *lane) {
	l.run(ctx)
	if l.isDeleted() {
		d.mu.Lock()
		if d.lanes[l.id] == l {
			delete(d.lanes, l.id)
		}
		d.mu.Unlock()
	}
}

// Run delivers until ctx ends. At shutdown it stops pulling, lets in-flight
// POSTs finish (each is bounded by its destination's timeout), and hands
// every message it still holds back to JetStream for another replica.
func (d *Deliverer) Run(ctx context.Context) error {
	// The subscription starts with every destination and decision, then
	// carries each change; this loop is the only one that applies them.
	sub := d.view.Subscribe()
	defer sub.Close()
	for range d.cfg.Workers {
		d.group.Go(d.work)
	}
	d.group.Go(func() { lifecycle.Every(ctx, d.cfg.AckWait/3, d.keepAlive) })
	d.group.Go(func() { lifecycle.Every(ctx, d.cfg.LagInterval, d.watchLag) })
	d.group.Go(func() { lifecycle.Every(ctx, hangSweep, d.sweepHung) })
	d.group.Go(func() {
		d.adoptOrphans(ctx)
		lifecycle.Every(ctx, d.cfg.OrphanInterval, d.adoptOrphans)
	})
	for ctx.Err() == nil {
		select {
		case <-ctx.Done():
		case <-sub.Ready():
			for _, c := range sub.Take() {
				d.apply(ctx, c)
			}
		}
	}
	// Workers return once the scheduler is closed; lanes return with ctx.
	// Closing the group cancels retry timers: their messages are still
	// owned and handed back below.
	d.sched.Close()
	d.group.Stop()
	for _, l := range d.snapshot() {
		l.handBack()
	}
	return nil
}

// snapshot returns the current lanes.
func (d *Deliverer) snapshot() []*lane {
	d.mu.Lock()
	defer d.mu.Unlock()
	lanes := make([]*lane, 0, len(d.lanes))
	for _, l := range d.lanes {
		lanes = append(lanes, l)
	}
	return lanes
}

// keepAlive sends progress acks for every message a lane holds (queued,
// in flight or waiting to retry), so JetStream never redelivers a message
// this replica still owns: a redelivery would mean a second, concurrent
// POST. It is the body of a loop every AckWait/3.
func (d *Deliverer) keepAlive(context.Context) {
	for _, l := range d.snapshot() {
		l.touch()
	}
}

// watchLag refreshes each lane's gauges and checks it is not starving. It
// is the body of a loop every LagInterval.
func (d *Deliverer) watchLag(ctx context.Context) {
	var delivery jetstream.Stream // read once per round, when needed
	var oldestMax time.Duration
	for _, l := range d.snapshot() {
		if cons := l.consumer(); cons != nil {
			ictx, cancel := context.WithTimeout(ctx, 2*time.Second)
			if info, err := cons.Info(ictx); err == nil {
				d.metrics.pending.WithLabelValues(l.id).Set(float64(info.NumPending))
				d.checkStarving(l, info)
				age := d.oldestUndelivered(ictx, l, info, &delivery)
				oldestMax = max(oldestMax, age)
				if age > 0 {
					d.metrics.oldest.WithLabelValues(l.id).Set(age.Seconds())
				} else {
					d.metrics.oldest.DeleteLabelValues(l.id)
				}
			}
			cancel()
		}
		if st, ok := d.sched.Stats(l.id); ok {
			d.metrics.inflight.WithLabelValues(l.id).Set(float64(st.InFlight))
			d.metrics.capacity.WithLabelValues(l.id).Set(float64(st.Cap))
			d.metrics.queued.WithLabelValues(l.id).Set(float64(st.Queued))
		}
	}
	d.metrics.oldestMax.Set(oldestMax.Seconds())
}

// hangSweep is how often lanes are checked for requests hanging far
// beyond their usual latency (schedule.Sweep).
const hangSweep = 250 * time.Millisecond

// sweepHung cuts the in-flight cap of lanes whose requests hang; the body
// of a loop.
func (d *Deliverer) sweepHung(context.Context) {
	for _, id := range d.sched.Sweep() {
		d.metrics.hung.Inc()
		d.log.Warn("destination not answering far beyond its usual latency; one request in flight until it does", "destination", id)
	}
}

// starvingChecks is how many lag checks in a row must find a lane starving
// before its pull subscription is replaced: one could catch the instant
// between a pull completing and the next being sent.
const starvingChecks = 2

// checkStarving replaces the pull subscription of a lane whose consumer has
// a backlog and nothing outstanding: no pull waiting on the server and no
// message delivered to any replica. That is a pull the server lost; the
// heartbeat check usually repairs it first, this catches the rest. Only the
// lag watcher calls it.
func (d *Deliverer) checkStarving(l *lane, info *jetstream.ConsumerInfo) {
	if info.NumPending == 0 || info.NumWaiting > 0 || info.NumAckPending > 0 {
		l.starved = 0
		return
	}
	l.starved++
	if l.starved >= starvingChecks {
		l.starved = 0
		d.log.Warn("lane starving: backlog and no pull outstanding; pulling again",
			"destination", l.id, "pending", info.NumPending)
		l.starving()
	}
}

// oldestUndelivered returns how long the oldest of a lane's batches still in
// DELIVERY has waited, or 0 when it has none. What the lane holds answers
// without a request; otherwise, with a backlog, the first message on the
// destination's subject is read (DELIVERY is a work queue: the first is the
// oldest not yet delivered or parked). delivery caches the stream handle
// for the round.
func (d *Deliverer) oldestUndelivered(ctx context.Context, l *lane, info *jetstream.ConsumerInfo, delivery *jetstream.Stream) time.Duration {
	if at, ok := l.oldestOwned(); ok {
		return time.Since(at)
	}
	if info.NumPending == 0 && info.NumAckPending == 0 {
		return 0
	}
	if *delivery == nil {
		st, err := d.js.Stream(ctx, topology.StreamDelivery)
		if err != nil {
			return 0
		}
		*delivery = st
	}
	m, err := (*delivery).GetMsg(ctx, info.AckFloor.Stream+1, jetstream.WithGetMsgSubject(info.Config.FilterSubject))
	if err != nil {
		return 0
	}
	return time.Since(m.Time)
}

// limits returns the batch limits of a destination. The admin API stores
// every limit; a record without one gets registry's defaults, the same
// values the admin API would have filled in.
func (d *Deliverer) limits(dest *adminv1.Destination) batch.Limits {
	in := registry.DefaultDestination().Of(dest)
	return batch.Limits{MaxImpressions: int(in.MaxBatchImpressions), MaxBytes: int(in.MaxBatchBytes), Linger: in.Linger}
}

// timeout bounds one POST to dest.
func (d *Deliverer) timeout(dest *adminv1.Destination) time.Duration {
	if t := dest.GetTimeout().AsDuration(); t > 0 {
		return t
	}
	return registry.DefaultDestination().Timeout
}

// secrets returns the destination's signing keys (both during a rotation).
func secrets(dest *adminv1.Destination, now time.Time) ([][]byte, error) {
	keys, err := webhook.SigningKeys(dest.GetSecret(), dest.GetPreviousSecret(), dest.GetPreviousSecretExpires().AsTime(), now)
	if err != nil {
		return nil, fmt.Errorf("destination %s secret: %w", dest.GetId(), err)
	}
	return keys, nil
}
