package deliver

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"time"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	"github.com/bulkhead-io/bulkhead/pkg/lifecycle"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/services/deliverer/internal/batch"
	"github.com/bulkhead-io/bulkhead/services/deliverer/internal/schedule"
	"github.com/nats-io/nats.go/jetstream"
)

// run pulls the destination's messages into batches until ctx ends or the
// destination is deleted and its backlog parked. A pull subscription that
// ends by itself (its consumer deleted, the iterator closed under it) or that
// the lag watcher finds starving is replaced, so no lane stops serving its
// destination while the deliverer runs.
func (l *lane) run(ctx context.Context) {
	dest, _ := l.request()
	limits := l.d.limits(dest)
	b, err := batch.NewBuilder[routed](limits)
	if err != nil {
		// Limits are validated where they are stored; fall back to the
		// defaults rather than leave the destination unserved.
		l.d.log.Error("batch limits; using defaults", "destination", l.id, "err", err)
		if b, err = batch.NewBuilder[routed](l.d.limits(&adminv1.Destination{})); err != nil {
			l.d.log.Error("default batch limits", "destination", l.id, "err", err)
			return
		}
	}
	for attempt := 0; ; attempt++ {
		if !l.ensureConsumer(ctx) {
			return
		}
		why := l.consume(ctx, b)
		switch why {
		case endShutdown, endRemoved:
			return
		case endRepull:
			attempt = 0 // asked for: start again at once
		default:
			l.d.log.Warn("pull subscription ended; starting another", "destination", l.id, "reason", why.String())
			if !lifecycle.Sleep(ctx, lifecycle.Backoff(attempt, 100*time.Millisecond, 5*time.Second)) {
				return
			}
		}
		l.d.metrics.resubscribed.WithLabelValues(why.String()).Inc()
	}
}

// ending says why one pull subscription of a lane ended.
type ending int

const (
	endShutdown ending = iota // the deliverer is stopping
	endRemoved                // the destination is deleted and its backlog parked
	endRepull                 // the lag watcher found the lane starving
	endClosed                 // the iterator closed by itself (consumer deleted, connection closed)
	endFailed                 // Messages() refused to start
)

// pulled is one result of the iterator's blocking Next.
type pulled struct {
	msg jetstream.Msg
	err error
}

// consume runs one pull subscription. Next blocks in its own goroutine, so
// nats.go's missing-heartbeat check runs and a pull request the server
// dropped (a consumer leader change, a pull sent while the consumer had no
// leader) is re-issued after two missed heartbeats; with a short NextMaxWait
// that check never fires and the lane would wait forever.
func (l *lane) consume(ctx context.Context, b *batch.Builder[routed]) ending {
	// Pulls are bounded in bytes, so what the iterator buffers stays near
	// the lane's budget too; never below two messages of the largest size,
	// or a pull could not carry one.
	pullBytes := max(l.d.cfg.LaneMaxBytes/4, 2*int(l.d.js.Conn().MaxPayload()))
	it, err := l.consumer().Messages(
		jetstream.PullMaxBytes(pullBytes),
		jetstream.PullExpiry(stream.PullExpiry),
		jetstream.PullHeartbeat(stream.PullHeartbeat),
	)
	if err != nil {
		l.d.log.Error("consume", "destination", l.id, "err", err)
		return endFailed
	}
	defer it.Stop()
	msgs := make(chan pulled)
	var reader sync.WaitGroup
	reader.Add(1)
	go func() {
		defer reader.Done()
		defer close(msgs)
		for {
			m, err := it.Next()
			if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
				return
			}
			// The lane reads msgs until it is closed, so this send ends.
			msgs <- pulled{msg: m, err: err}
		}
	}()
	defer reader.Wait()

	// Once draining, the iterator hands over what it already pulled and then
	// closes msgs; those messages are owned, so handBack returns them.
	draining, why := false, endClosed
	done := ctx.Done()
	drain := func(reason ending) {
		if !draining {
			it.Drain()
			draining, why, done = true, reason, nil
		}
	}
	timer := time.NewTimer(time.Second)
	defer timer.Stop()
	for {
		if b.Len() == 0 {
			// Take changed batch limits between batches.
			dest, _ := l.request()
			l.resize(b, l.d.limits(dest))
		}
		wait := time.Second
		if dl, ok := b.Deadline(); ok {
			wait = max(time.Until(dl), time.Millisecond)
		}
		timer.Reset(wait)
		// At its byte budget the lane takes nothing more until it acks
		// (release wakes it); the rest waits in DELIVERY. Draining takes
		// everything, to hand it back.
		in := msgs
		if !draining && l.full() {
			in = nil
		}
		select {
		case p, ok := <-in:
			if !ok {
				return why
			}
			switch {
			case errors.Is(p.err, jetstream.ErrNoHeartbeat):
				// nats.go has reset its pull accounting; the next Next pulls again.
				l.d.metrics.resubscribed.WithLabelValues("heartbeat").Inc()
				l.d.log.Warn("no heartbeat from the consumer; pulling again", "destination", l.id)
			case p.err != nil:
				l.d.log.Warn("next", "destination", l.id, "err", p.err)
			default:
				if r, ok := l.accept(p.msg); ok && !draining {
					l.add(ctx, b, r)
				}
			}
		case <-timer.C:
		case <-l.wake:
		case <-l.repull:
			drain(endRepull)
		case <-done:
			drain(endShutdown)
		}
		if draining {
			continue
		}
		if reason, held := l.holding(); held {
			// Whatever was waiting for company goes to PARKED now.
			if b.Len() > 0 {
				l.park(&job{lane: l, batch: b.Take()}, reason)
			}
			if l.isDeleted() && l.backlogEmpty(ctx) {
				l.remove(ctx)
				drain(endRemoved)
			}
			continue
		}
		if b.Due(time.Now()) {
			l.push(ctx, b.Take())
		}
	}
}

// resize gives an empty b the destination's current limits. Invalid limits
// (refused at the admin API, so only from a hand-edited KV value) leave the
// previous ones in force.
func (l *lane) resize(b *batch.Builder[routed], limits batch.Limits) {
	if b.Limits() != limits {
		_ = b.SetLimits(limits)
	}
}

// starving tells the lane its pull subscription has a backlog and no pull
// outstanding; the lane replaces it.
func (l *lane) starving() {
	select {
	case l.repull <- struct{}{}:
	default:
	}
}

func (l *lane) add(ctx context.Context, b *batch.Builder[routed], r routed) {
	if reason, held := l.holding(); held {
		l.park(&job{lane: l, batch: batch.Batch[routed]{Items: []batch.Item[routed]{item(r)}}}, reason)
		return
	}
	it := item(r)
	if !b.Fits(it) {
		l.push(ctx, b.Take())
	}
	if err := b.Add(it, time.Now()); err != nil {
		l.d.log.Error("batch add", "destination", l.id, "err", err)
	}
	if b.Full() {
		l.push(ctx, b.Take())
	}
}

func item(r routed) batch.Item[routed] {
	id := r.msg.Headers().Get(jetstream.MsgIDHeader)
	if id == "" {
		id = "seq-" + strconv.FormatUint(r.seq, 10)
	}
	// The body share is estimated from the protobuf size: close enough to
	// the JSON size to keep POSTs within the limit's order of magnitude.
	return batch.Item[routed]{ID: id, Impressions: len(r.batch.GetImpressions()), Bytes: len(r.msg.Data()) * 2, Value: r}
}

// push hands a batch to the scheduler, waiting while the lane is full: that
// wait is the backpressure that leaves a slow destination's backlog in
// JetStream instead of in memory.
func (l *lane) push(ctx context.Context, b batch.Batch[routed]) {
	j := &job{lane: l, batch: b, first: time.Now()}
	for {
		err := l.d.sched.Push(l.id, l.tenant, j, max(b.Impressions, 1))
		switch {
		case err == nil:
			return
		case errors.Is(err, schedule.ErrLaneFull):
			if reason, held := l.holding(); held {
				l.park(j, reason)
				return
			}
			select {
			case <-ctx.Done():
				return // handBack returns the messages
			case <-l.wake:
			case <-time.After(20 * time.Millisecond):
			}
		default:
			return // closed: handBack returns the messages
		}
	}
}

func (e ending) String() string {
	return [...]string{"shutdown", "removed", "starving", "closed", "failed"}[e]
}
