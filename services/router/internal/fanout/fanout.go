// Package fanout consumes accepted impressions and fans each batch out to the
// tenant's destinations: to imp.deliver.<dest> when the destination may
// receive traffic, to imp.parked.<dest> when it is quarantined or paused or
// its DELIVERY budget is spent. The input is acknowledged once every output
// is stored, or the outputs that could not be are handed back on their own.
package fanout

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/lifecycle"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/bulkhead-io/bulkhead/services/router/internal/route"
)

// Config tunes the router.
type Config struct {
	// Workers route batches concurrently.
	Workers int
	// AckWait is how long a batch may take before JetStream redelivers it.
	AckWait time.Duration
	// MaxAckPending bounds batches in flight across all replicas.
	MaxAckPending int
	// PublishTimeout bounds the wait for the outputs to be stored.
	PublishTimeout time.Duration
	// OverBudget, when set, is told of every destination whose output was
	// parked because its DELIVERY backlog was at its budget (the replayer
	// moves those batches back once there is room).
	OverBudget func(dest string)
}

// Fanout is the fan-out worker pool.
type Fanout struct {
	js      jetstream.JetStream
	reg     *registry.Registry
	cfg     Config
	log     *slog.Logger
	metrics *metrics
	// wave bounds the outputs of one batch awaiting their acks at once: with
	// every worker at it, half the connection's async window is in use.
	wave int
}

// New returns a fan-out reading destinations and decisions from reg.
func New(js jetstream.JetStream, reg *registry.Registry, cfg Config, log *slog.Logger, r prometheus.Registerer) (*Fanout, error) {
	m, err := newMetrics(r)
	if err != nil {
		return nil, err
	}
	return &Fanout{js: js, reg: reg, cfg: cfg, log: log, metrics: m, wave: max(1, asyncWindow/(2*max(cfg.Workers, 1)))}, nil
}

// Run consumes until ctx ends, then finishes the batches in flight (and those
// already pulled) before returning. A pull that the server drops is sent
// again after two missed heartbeats, and a subscription that ends by itself
// (its consumer deleted, say) is replaced: a router never stops routing
// while it runs.
func (r *Fanout) Run(ctx context.Context) error {
	// On a fresh or recovering cluster creating the consumer can fail for a
	// while (no meta leader yet); a router waits, it does not exit.
	var cons jetstream.Consumer
	for attempt := 0; cons == nil; attempt++ {
		c, err := r.ensureConsumer(ctx)
		if err == nil {
			cons = c
			break
		}
		r.log.Warn("router consumer not created yet; retrying", "err", err)
		if !lifecycle.Sleep(ctx, lifecycle.Backoff(attempt, 100*time.Millisecond, 5*time.Second)) {
			return nil
		}
	}
	// One group owns the lag watcher, the gate and the workers. Stages stop
	// in order: closing arrivals ends the gate, which closes work, which
	// ends the workers; ctx ends the lag watcher.
	var g lifecycle.Group
	// Info asks by name, so this handle serves a re-created consumer too.
	g.Go(func() { lifecycle.Every(ctx, 2*time.Second, func(ctx context.Context) { r.checkLag(ctx, cons) }) })

	// Three stages: consume stamps each batch with when it was received,
	// the gate lets batches through in waves once the destination view is
	// known to be current as of the wave's newest one, and the workers
	// route. Waiting in waves, not per worker, keeps the view check (one
	// round trip) from capping throughput at workers per round trip.
	arrivals := make(chan arrival, 2*r.cfg.Workers)
	work := make(chan arrival)
	for range r.cfg.Workers {
		g.Go(func() {
			for a := range work {
				r.handle(a)
			}
		})
	}
	g.Go(func() {
		r.gate(arrivals, work)
		close(work)
	})
	defer func() {
		close(arrivals)
		g.Stop()
	}()

	for attempt := 0; ctx.Err() == nil; attempt++ {
		if err := r.consume(ctx, cons, arrivals); err != nil {
			r.log.Warn("router subscription ended; starting another", "err", err)
		}
		if ctx.Err() != nil {
			break
		}
		r.metrics.repulls.WithLabelValues("closed").Inc()
		if !lifecycle.Sleep(ctx, lifecycle.Backoff(attempt, 100*time.Millisecond, 5*time.Second)) {
			break
		}
		if c, err := r.ensureConsumer(ctx); err == nil {
			cons = c
		}
	}
	return nil
}

// ensureConsumer creates or updates the routers' shared durable consumer.
func (r *Fanout) ensureConsumer(ctx context.Context) (jetstream.Consumer, error) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cons, err := r.js.CreateOrUpdateConsumer(cctx, topology.StreamImpressions, jetstream.ConsumerConfig{
		Durable:       topology.ConsumerRouter,
		Description:   "routers: fan accepted impressions out to destinations",
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       r.cfg.AckWait,
		MaxAckPending: r.cfg.MaxAckPending,
		MaxDeliver:    -1, // never give up on an accepted batch (invariant 1)
		FilterSubject: topology.AllIn,
	})
	if err != nil {
		return nil, fmt.Errorf("consumer %s: %w", topology.ConsumerRouter, err)
	}
	return cons, nil
}

// consume runs one pull subscription, sending what it pulls to arrivals,
// until ctx ends (then it drains: what was pulled is still routed) or the
// iterator closes by itself.
func (r *Fanout) consume(ctx context.Context, cons jetstream.Consumer, arrivals chan<- arrival) error {
	it, err := cons.Messages(
		jetstream.PullMaxMessages(2*r.cfg.Workers),
		jetstream.PullExpiry(stream.PullExpiry),
		jetstream.PullHeartbeat(stream.PullHeartbeat),
	)
	if err != nil {
		return fmt.Errorf("consume %s: %w", topology.ConsumerRouter, err)
	}
	defer it.Stop()
	stop := make(chan struct{})
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		select {
		case <-ctx.Done():
			// Drain hands over what was already pulled, then ends the iterator.
			it.Drain()
		case <-stop:
		}
	}()
	defer func() {
		close(stop)
		<-drained
	}()
	for {
		m, err := it.Next()
		switch {
		case errors.Is(err, jetstream.ErrMsgIteratorClosed):
			return nil
		case errors.Is(err, jetstream.ErrNoHeartbeat):
			// nats.go has reset its pull accounting; the next Next pulls again.
			r.metrics.repulls.WithLabelValues("heartbeat").Inc()
			r.log.Warn("no heartbeat from the router consumer; pulling again")
		case err != nil:
			r.log.Warn("next", "err", err)
		default:
			arrivals <- arrival{msg: m, at: time.Now()}
		}
	}
}

// arrival is a pulled batch and when this router received it.
type arrival struct {
	msg jetstream.Msg
	at  time.Time
}

// gate passes batches to the workers once the destination view holds every
// change stored before they were received: a destination created before a
// batch was accepted gets that batch even if the registry watch has not
// delivered the destination yet. It takes every batch waiting at the time
// as one wave, so the check costs one round trip per wave.
func (r *Fanout) gate(arrivals <-chan arrival, work chan<- arrival) {
	var wave []arrival
	for a := range arrivals {
		wave = append(wave[:0], a)
	more:
		for {
			select {
			case a, ok := <-arrivals:
				if !ok {
					break more
				}
				wave = append(wave, a)
			default:
				break more
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), r.cfg.PublishTimeout)
		err := r.reg.AwaitCurrent(ctx, wave[len(wave)-1].at)
		cancel()
		for _, a := range wave {
			if err != nil {
				r.metrics.viewBehind.Inc()
				r.retryLater(a.msg, err)
				continue
			}
			work <- a
		}
	}
}

// handle routes one accepted batch. It runs to completion even during
// shutdown (bounded by PublishTimeout) so no batch is left half-routed longer
// than needed. Each output stands alone: a destination over its DELIVERY
// budget gets its share parked, and an output that cannot be stored at all
// is handed back on its own (a remainder), so the batch's other outputs are
// neither held nor stored again.
func (r *Fanout) handle(a arrival) {
	m := a.msg
	var b eventv1.Batch
	if err := proto.Unmarshal(m.Data(), &b); err != nil {
		// Ingest only stores valid batches; this is corruption, not input.
		r.log.Error("undecodable batch terminated", "subject", m.Subject(), "err", err)
		r.metrics.batches.WithLabelValues("corrupt").Inc()
		if err := m.Term(); err != nil {
			r.log.Warn("term", "err", err)
		}
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), r.cfg.PublishTimeout)
	defer cancel()
	targets := route.Plan(&b, r.reg.ForTenant(b.GetTenantId()), r.reg.State)
	if only := m.Headers().Get(topology.HeaderTargets); only != "" {
		targets = route.Only(targets, strings.Split(only, ","))
	}
	failed, err := r.publish(ctx, &b, targets)
	switch {
	case len(failed) == 0:
	case len(failed) == len(targets):
		// Nothing stored: hand the batch back as it is.
		r.retryLater(m, err)
		return
	default:
		if rerr := r.handBack(ctx, m, &b, failed); rerr != nil {
			// Not even the remainder could be stored: the whole batch
			// comes back, and its stored outputs are de-duplicated by id.
			r.retryLater(m, fmt.Errorf("%w; remainder: %w", err, rerr))
			return
		}
		r.log.Warn("some outputs not stored; handed back on their own", "batch", b.GetBatchId(), "destinations", len(failed), "err", err)
		r.metrics.batches.WithLabelValues("partial").Inc()
	}
	if err := m.Ack(); err != nil {
		// Not acknowledged means redelivered: duplicates are suppressed by
		// the outputs' message ids.
		r.log.Warn("ack", "err", err)
	}
	r.metrics.batches.WithLabelValues("routed").Inc()
	r.metrics.latency.Observe(time.Since(a.at).Seconds())
	stored := targets[:0:0]
	for _, t := range targets {
		if !slices.Contains(failed, t.DestinationID) {
			stored = append(stored, t)
		}
	}
	for _, t := range stored {
		action := "deliver"
		if t.Park {
			action = "park"
		}
		r.metrics.impressions.WithLabelValues(t.DestinationID, action).Add(float64(len(t.Impressions)))
	}
}

// publish stores every target's share and waits until all are stored. A
// share its destination's DELIVERY budget refuses is parked instead
// (parked.OverBudget). It returns the destinations whose share could not be
// stored, and the first error.
func (r *Fanout) publish(ctx context.Context, b *eventv1.Batch, targets []route.Target) ([]string, error) {
	var failed []string
	var firstErr error
	// In waves: the connection's window of unacknowledged publishes is
	// shared by every worker, and one batch of a tenant with a thousand
	// destinations must not fill it and stall everyone's routing.
	for start := 0; start < len(targets); start += r.wave {
		end := min(start+r.wave, len(targets))
		f, err := r.publishWave(ctx, b, targets[start:end])
		failed = append(failed, f...)
		if firstErr == nil {
			firstErr = err
		}
	}
	return failed, firstErr
}

// asyncWindow is nats.go's default bound on a connection's unacknowledged
// async publishes; past it every publish stalls.
const asyncWindow = 4000

// publishWave stores targets' shares of b and waits for them.
func (r *Fanout) publishWave(ctx context.Context, b *eventv1.Batch, targets []route.Target) ([]string, error) {
	futures := make([]jetstream.PubAckFuture, len(targets))
	for i := range targets {
		f, err := r.publishOne(b, &targets[i])
		if err != nil {
			// Those already started are waited for by nobody; their ids
			// make a retry store each once.
			return ids(targets), err
		}
		futures[i] = f
	}
	var failed []string
	var firstErr error
	fail := func(dest string, err error) {
		failed = append(failed, dest)
		if firstErr == nil {
			firstErr = err
		}
	}
	for i, f := range futures {
		err := wait(ctx, f)
		if err != nil && stream.IsSubjectFull(err) && !targets[i].Park {
			// Over budget: park this share (and this share only) with the reason.
			r.metrics.overBudget.Inc()
			if r.cfg.OverBudget != nil {
				r.cfg.OverBudget(targets[i].DestinationID)
			}
			targets[i].Park = true
			targets[i].Reason = parked.Reason{Class: parked.OverBudget}
			if f, err = r.publishOne(b, &targets[i]); err == nil {
				err = wait(ctx, f)
			}
		}
		if err != nil {
			if stream.IsFull(err) || stream.IsSubjectFull(err) {
				r.metrics.full.Inc()
			}
			fail(targets[i].DestinationID, err)
		}
	}
	return failed, firstErr
}

// publishOne starts storing t's share of b.
func (r *Fanout) publishOne(b *eventv1.Batch, t *route.Target) (jetstream.PubAckFuture, error) {
	out := &eventv1.Batch{
		BatchId: b.GetBatchId(), TenantId: b.GetTenantId(), DestinationId: t.DestinationID,
		AcceptedAt: b.GetAcceptedAt(), Impressions: t.Impressions,
	}
	// One id per (batch, destination): a redelivered input re-publishes
	// the same ids and JetStream stores each output once.
	msgID := b.GetBatchId() + "." + t.DestinationID
	var msg *nats.Msg
	var err error
	if t.Park {
		msg, err = parked.NewMsg(out, t.Reason, 0, msgID)
	} else {
		msg, err = deliverMsg(out, msgID)
	}
	if err != nil {
		return nil, err
	}
	f, err := r.js.PublishMsgAsync(msg)
	if err != nil {
		return nil, fmt.Errorf("publish %s: %w", msg.Subject, err)
	}
	return f, nil
}

// wait returns f's outcome, or ctx's end.
func wait(ctx context.Context, f jetstream.PubAckFuture) error {
	select {
	case <-f.Ok():
		return nil
	case err := <-f.Err():
		return fmt.Errorf("publish %s: %w", f.Msg().Subject, err)
	case <-ctx.Done():
		return fmt.Errorf("publish %s: %w", f.Msg().Subject, ctx.Err())
	}
}

// handBack stores, on the tenant's own subject in IMPRESSIONS, the batch
// narrowed to the destinations in failed (HeaderTargets), so only their
// outputs are tried again, and it waits in the tenant's share of the
// stream, not in the routers' window. Its id is derived from the batch and
// the destinations, so a repeated hand-back is stored once.
func (r *Fanout) handBack(ctx context.Context, m jetstream.Msg, b *eventv1.Batch, failed []string) error {
	subj, err := topology.In(b.GetTenantId())
	if err != nil {
		return err
	}
	slices.Sort(failed)
	targets := strings.Join(failed, ",")
	h := sha256.Sum256([]byte(targets))
	rest := nats.NewMsg(subj)
	rest.Data = m.Data() // the accepted batch as it is: the header narrows it
	rest.Header.Set(topology.HeaderTargets, targets)
	rest.Header.Set(jetstream.MsgIDHeader, b.GetBatchId()+".rest."+hex.EncodeToString(h[:8]))
	rest.Header.Set(jetstream.ExpectedStreamHeader, topology.StreamImpressions)
	if _, err := r.js.PublishMsg(ctx, rest); err != nil {
		return fmt.Errorf("hand back %s: %w", subj, err)
	}
	return nil
}

func ids(targets []route.Target) []string {
	out := make([]string, len(targets))
	for i, t := range targets {
		out[i] = t.DestinationID
	}
	return out
}

func deliverMsg(b *eventv1.Batch, msgID string) (*nats.Msg, error) {
	subj, err := topology.Deliver(b.GetDestinationId())
	if err != nil {
		return nil, err
	}
	data, err := proto.Marshal(b)
	if err != nil {
		return nil, err
	}
	m := nats.NewMsg(subj)
	m.Data = data
	m.Header.Set(jetstream.MsgIDHeader, msgID)
	return m, nil
}

// retryLater hands the batch back with a growing delay. A full DELIVERY or
// PARKED stream ends up here: routing waits (and alarms) instead of dropping.
func (r *Fanout) retryLater(m jetstream.Msg, err error) {
	n := uint64(1)
	if md, merr := m.Metadata(); merr == nil {
		n = md.NumDelivered
	}
	delay := min(100*time.Millisecond<<min(n, 7), 10*time.Second)
	if stream.IsFull(err) || stream.IsSubjectFull(err) {
		r.log.Error("destination stream or share full; routing waits", "err", err, "retry_in", delay)
	} else {
		r.log.Warn("routing failed; will retry", "err", err, "retry_in", delay)
	}
	r.metrics.batches.WithLabelValues("retry").Inc()
	if nerr := m.NakWithDelay(delay); nerr != nil {
		r.log.Warn("nak", "err", nerr)
	}
}

// checkLag refreshes the consumer's lag gauges; the body of a loop.
func (r *Fanout) checkLag(ctx context.Context, cons jetstream.Consumer) {
	ictx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if info, err := cons.Info(ictx); err == nil {
		r.metrics.pending.Set(float64(info.NumPending))
		r.metrics.ackPending.Set(float64(info.NumAckPending))
	}
}
