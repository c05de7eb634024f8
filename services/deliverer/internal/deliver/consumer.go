package deliver

import (
	"context"
	"time"

	"github.com/bulkhead-io/bulkhead/pkg/lifecycle"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/nats-io/nats.go/jetstream"
)

// consumer returns the destination's consumer, or nil before it exists.
func (l *lane) consumer() jetstream.Consumer {
	if c := l.cons.Load(); c != nil {
		return *c
	}
	return nil
}

// ensureConsumer creates the destination's durable consumer, retrying until
// it exists or ctx ends.
func (l *lane) ensureConsumer(ctx context.Context) bool {
	subj, err := topology.Deliver(l.id)
	if err != nil {
		l.d.log.Error("destination id", "err", err)
		return false
	}
	name, _ := topology.DeliverConsumer(l.id) // valid: Deliver checked the id
	for attempt := 0; ; attempt++ {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		cons, err := l.d.js.CreateOrUpdateConsumer(cctx, topology.StreamDelivery, jetstream.ConsumerConfig{
			Durable:       name,
			Description:   "deliverers of destination " + l.id,
			FilterSubject: subj,
			AckPolicy:     jetstream.AckExplicitPolicy,
			AckWait:       l.d.cfg.AckWait,
			MaxAckPending: l.d.cfg.MaxAckPending,
			MaxDeliver:    -1, // parking, not JetStream, ends a batch's attempts
		})
		cancel()
		if err == nil {
			l.cons.Store(&cons)
			return true
		}
		l.d.log.Error("create consumer", "destination", l.id, "err", err)
		if !lifecycle.Sleep(ctx, lifecycle.Backoff(attempt, time.Second, 30*time.Second)) {
			return false
		}
	}
}

// backlogEmpty reports whether a deleted destination has nothing left in
// DELIVERY and nothing owned.
func (l *lane) backlogEmpty(ctx context.Context) bool {
	l.mu.Lock()
	owned := len(l.owned)
	l.mu.Unlock()
	if owned > 0 {
		return false
	}
	ictx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	info, err := l.consumer().Info(ictx)
	return err == nil && info.NumPending == 0 && info.NumAckPending == 0
}

// remove deletes the consumer of a deleted destination and its lane.
func (l *lane) remove(ctx context.Context) {
	for _, j := range l.d.sched.Remove(l.id) {
		l.park(j, parked.Reason{Class: parked.Deleted})
	}
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	name, _ := topology.DeliverConsumer(l.id)
	if err := l.d.js.DeleteConsumer(dctx, topology.StreamDelivery, name); err != nil {
		l.d.log.Warn("delete consumer", "destination", l.id, "err", err)
	}
	l.d.log.Info("destination removed", "destination", l.id)
}
