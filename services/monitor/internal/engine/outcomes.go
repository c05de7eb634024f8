package engine

import (
	"context"
	"errors"
	"time"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/lifecycle"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/bulkhead-io/bulkhead/services/monitor/internal/health"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// consumeOutcomes reads every outcome (each replica has its own ordered
// consumer, so every replica keeps statistics for the admin API) and, on the
// leader, feeds the machine. A consumer that ends is created again.
func (e *Engine) consumeOutcomes(ctx context.Context) {
	for ctx.Err() == nil {
		cons, err := e.js.OrderedConsumer(ctx, topology.StreamOutcomes, jetstream.OrderedConsumerConfig{
			FilterSubjects: []string{topology.AllOutcomes},
			DeliverPolicy:  jetstream.DeliverNewPolicy,
		})
		if err != nil {
			e.log.Warn("outcomes consumer", "err", err)
			lifecycle.Sleep(ctx, time.Second)
			continue
		}
		it, err := cons.Messages(jetstream.PullExpiry(stream.PullExpiry), jetstream.PullHeartbeat(stream.PullHeartbeat))
		if err != nil {
			e.log.Warn("outcomes", "err", err)
			lifecycle.Sleep(ctx, time.Second)
			continue
		}
		// Stops the iterator when ctx ends; no goroutine per consumer.
		unhook := context.AfterFunc(ctx, it.Stop)
		for {
			msg, err := it.Next()
			if errors.Is(err, jetstream.ErrNoHeartbeat) {
				continue // nats.go pulls again
			}
			if err != nil {
				break
			}
			var o eventv1.Outcome
			if err := proto.Unmarshal(msg.Data(), &o); err != nil {
				continue
			}
			e.observe(ctx, &o)
		}
		it.Stop()
		unhook()
	}
}

func (e *Engine) observe(ctx context.Context, o *eventv1.Outcome) {
	now := time.Now()
	e.statsMu.Lock()
	w := e.windows[o.GetDestinationId()]
	if w == nil {
		var err error
		if w, err = health.NewWindow(e.cfg.Policy.Window, e.cfg.Policy.Bucket, e.cfg.Policy.SlowFraction); err != nil {
			e.statsMu.Unlock()
			return
		}
		e.windows[o.GetDestinationId()] = w
	}
	w.Add(o, now)
	e.stalls.Attempt(o.GetDestinationId(), now)
	e.statsMu.Unlock()
	e.metrics.outcomes.Inc()

	m := e.leading()
	if m == nil || e.cfg.Disabled {
		return
	}
	for _, d := range m.Observe(o, now) {
		e.store(ctx, m, d)
	}
}

// Stats returns the window statistics of a destination for the admin API.
func (e *Engine) Stats(id string) *adminv1.DestinationHealth {
	e.statsMu.Lock()
	defer e.statsMu.Unlock()
	w := e.windows[id]
	if w == nil {
		// A destination never attempted can still be stalled.
		if since := e.stalls.Since(id); !since.IsZero() {
			return &adminv1.DestinationHealth{StalledSince: timestamppb.New(since)}
		}
		return nil
	}
	now := time.Now()
	c := w.Counts(now)
	h := &adminv1.DestinationHealth{
		WindowAttempts:      c.Attempts,
		ErrorRate:           c.ErrorRate(),
		ConsecutiveFailures: int32(w.Consecutive(now)),
		LatencyP50Ms:        w.Latency(now, 0.5),
		LatencyP99Ms:        w.Latency(now, 0.99),
		FailuresByClass:     map[string]int64{},
	}
	for cls, n := range c.ByClass {
		if cls != 0 && n > 0 {
			h.FailuresByClass[eventv1.ErrorClass(cls).String()] = n
		}
	}
	if ls := w.LastSuccess(); !ls.IsZero() {
		h.LastSuccess = timestamppb.New(ls)
	}
	if since := e.stalls.Since(id); !since.IsZero() {
		h.StalledSince = timestamppb.New(since)
	}
	return h
}
