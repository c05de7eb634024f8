package deliver

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/lifecycle"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/bulkhead-io/bulkhead/services/deliverer/internal/batch"
	"github.com/bulkhead-io/bulkhead/services/deliverer/internal/schedule"
)

// routed is one DELIVERY message with its decoded batch.
type routed struct {
	msg   jetstream.Msg
	seq   uint64
	batch *eventv1.Batch
}

// owned is a message a lane holds until it is acknowledged or handed back.
type owned struct {
	msg    jetstream.Msg
	stored time.Time // when DELIVERY stored it
}

// job is one POST: a batch of routed messages and its retry state.
type job struct {
	lane    *lane
	batch   batch.Batch[routed]
	body    []byte
	attempt int
	first   time.Time
}

// lane is one destination: its consumer, its batch builder and every message
// it owns until acknowledged.
type lane struct {
	d      *Deliverer
	id     string
	tenant string
	// cons is set once ensureConsumer succeeds; the lag watcher reads it
	// from its own goroutine, possibly before then.
	cons atomic.Pointer[jetstream.Consumer]

	mu      sync.Mutex
	dest    *adminv1.Destination
	secrets [][]byte
	hold    parked.Class // why the destination must not receive traffic now; 0 while it may
	state   eventv1.State
	deleted bool
	owned   map[uint64]owned // by stream sequence
	wake    chan struct{}
	// repull asks the lane to replace its pull subscription (see starving).
	repull chan struct{}
	// starved counts the lag watcher's consecutive starving observations;
	// only the watcher's goroutine touches it.
	starved int
}

func newLane(d *Deliverer, dest *adminv1.Destination) *lane {
	l := &lane{d: d, id: dest.GetId(), tenant: dest.GetTenantId(), owned: map[uint64]owned{}, wake: make(chan struct{}, 1), repull: make(chan struct{}, 1)}
	l.setDestination(dest)
	return l
}

func (l *lane) setDestination(dest *adminv1.Destination) {
	s, err := secrets(dest, time.Now())
	l.mu.Lock()
	l.dest = dest
	l.deleted = false // re-created under the same id
	if err != nil {
		l.d.log.Error("destination unusable", "destination", l.id, "err", err)
		s = nil
	}
	l.secrets = s
	l.mu.Unlock()
	l.update()
}

func (l *lane) setDecision(dec *eventv1.Decision) {
	l.mu.Lock()
	l.state = dec.GetState()
	l.mu.Unlock()
	l.update()
}

func (l *lane) setDeleted() {
	l.mu.Lock()
	l.deleted = true
	l.mu.Unlock()
	l.update()
}

// update recomputes whether the lane holds its traffic. When it starts to,
// queued batches are taken back from the scheduler and parked at once, so a
// quarantined destination frees every slot it held but those in flight.
func (l *lane) update() {
	l.mu.Lock()
	was := l.hold
	c, held := registry.Hold(l.dest, l.state)
	switch {
	case l.deleted:
		l.hold = parked.Deleted
	case held:
		l.hold = c
	case l.secrets == nil:
		l.hold = parked.NoSecret
	default:
		l.hold = 0
	}
	now := l.hold
	l.mu.Unlock()
	if now != 0 && was == 0 {
		jobs := l.d.sched.Drain(l.id)
		// Refused only at shutdown: the jobs' messages are still owned, and
		// handBack returns them.
		if len(jobs) > 0 {
			l.d.group.Go(func() {
				for _, j := range jobs {
					l.park(j, parked.Reason{Class: now})
				}
			})
		}
	}
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// holding returns why the lane holds its traffic, and false while it does
// not.
func (l *lane) holding() (parked.Reason, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return parked.Reason{Class: l.hold}, l.hold != 0
}

// request returns what a POST needs from the destination's current settings.
func (l *lane) request() (*adminv1.Destination, [][]byte) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.dest, l.secrets
}

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
			if !lifecycle.Sleep(ctx, min(100*time.Millisecond<<min(attempt, 5), 5*time.Second)) {
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

func (e ending) String() string {
	return [...]string{"shutdown", "removed", "starving", "closed", "failed"}[e]
}

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
	it, err := l.consumer().Messages(
		jetstream.PullMaxMessages(64),
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
		select {
		case p, ok := <-msgs:
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

// accept records a message as owned, or skips a redelivery of one already
// owned (a progress ack was late): that one is still being worked on.
func (l *lane) accept(m jetstream.Msg) (routed, bool) {
	md, err := m.Metadata()
	if err != nil {
		l.d.log.Error("message without metadata", "destination", l.id, "err", err)
		return routed{}, false
	}
	seq := md.Sequence.Stream
	l.mu.Lock()
	_, dup := l.owned[seq]
	if !dup {
		l.owned[seq] = owned{msg: m, stored: md.Timestamp}
	}
	l.mu.Unlock()
	if dup {
		return routed{}, false
	}
	var bt eventv1.Batch
	if err := proto.Unmarshal(m.Data(), &bt); err != nil {
		// The router only publishes valid batches: this is corruption.
		l.d.log.Error("undecodable batch terminated", "destination", l.id, "seq", seq, "err", err)
		l.release(seq)
		_ = m.Term()
		return routed{}, false
	}
	return routed{msg: m, seq: seq, batch: &bt}, true
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

// park stores every message of j in PARKED with reason, then acknowledges it.
// A message that cannot be parked (PARKED full, NATS away) is handed back
// with a delay and parked again later; it is never dropped.
func (l *lane) park(j *job, reason parked.Reason) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, it := range j.batch.Items {
		r := it.Value
		if r.batch.GetDestinationId() == "" {
			r.batch.DestinationId = l.id
		}
		if err := parked.Park(ctx, l.d.js, r.batch, reason, int32(j.attempt), it.ID); err != nil {
			l.d.log.Error("park failed; message handed back", "destination", l.id, "err", err)
			l.d.metrics.parkFailed.Inc()
			l.release(r.seq)
			_ = r.msg.NakWithDelay(5 * time.Second)
			continue
		}
		l.d.metrics.parked.WithLabelValues(l.id, reason.Class.String()).Add(float64(len(r.batch.GetImpressions())))
		l.ack(r)
	}
}

func (l *lane) ack(r routed) {
	if err := r.msg.Ack(); err != nil {
		l.d.log.Warn("ack", "destination", l.id, "err", err)
	}
	l.release(r.seq)
}

func (l *lane) release(seq uint64) {
	l.mu.Lock()
	delete(l.owned, seq)
	l.mu.Unlock()
}

// oldestOwned returns when the oldest message the lane holds was stored,
// and false when it holds none.
func (l *lane) oldestOwned() (time.Time, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var oldest time.Time
	for _, o := range l.owned {
		if oldest.IsZero() || o.stored.Before(oldest) {
			oldest = o.stored
		}
	}
	return oldest, !oldest.IsZero()
}

// touch extends the ack deadline of every owned message.
func (l *lane) touch() {
	l.mu.Lock()
	msgs := make([]jetstream.Msg, 0, len(l.owned))
	for _, o := range l.owned {
		msgs = append(msgs, o.msg)
	}
	l.mu.Unlock()
	for _, m := range msgs {
		_ = m.InProgress()
	}
}

// handBack returns every owned message to JetStream at shutdown, so another
// replica delivers it without waiting for the ack deadline.
func (l *lane) handBack() {
	l.mu.Lock()
	msgs := l.owned
	l.owned = map[uint64]owned{}
	l.mu.Unlock()
	for _, o := range msgs {
		_ = o.msg.Nak()
	}
}

// consumer returns the destination's consumer, or nil before it exists.
func (l *lane) consumer() jetstream.Consumer {
	if c := l.cons.Load(); c != nil {
		return *c
	}
	return nil
}

func (l *lane) isDeleted() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.deleted
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
		if !lifecycle.Sleep(ctx, min(time.Second<<min(attempt, 5), 30*time.Second)) {
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

// exhausted is the reason of a batch whose retries ran out.
func exhausted(attempts int, err error) parked.Reason {
	return parked.Because(parked.Exhausted, "retries exhausted after %d attempts: %v", attempts, err)
}
