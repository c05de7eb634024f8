package deliver

import (
	"context"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/bulkhead-io/bulkhead/pkg/webhook"
	"github.com/bulkhead-io/bulkhead/services/deliverer/internal/schedule"
	"github.com/prometheus/client_golang/prometheus"
)

// work is one worker of the shared pool: it takes the next batch the
// scheduler picks, POSTs it once, and settles it. It never waits for a retry.
func (d *Deliverer) work() {
	for {
		t, err := d.sched.Next(context.Background())
		if err != nil {
			return // closed
		}
		j := t.Item
		l := j.lane
		if reason, held := l.holding(); held {
			l.park(j, reason)
			d.sched.Done(t, schedule.Neutral)
			continue
		}
		release, over := d.claimShares(j)
		if over != nil {
			// Over a share: fresh traffic keeps its workers; this batch
			// waits a little without holding one.
			over.Inc()
			d.sched.Done(t, schedule.Neutral)
			d.group.AfterFunc(retryDeferral, func() { d.requeue(j) })
			continue
		}
		d.sched.Done(t, d.attempt(j))
		release()
	}
}

// claimShares takes the workers' shares j counts against: a replayed
// batch one of ReplayShare, a retry one of RetryShare. It returns what
// gives them back, or, when a share is spent, its deferral counter (and
// holds nothing).
func (d *Deliverer) claimShares(j *job) (release func(), over prometheus.Counter) {
	var held []*atomic.Int64
	release = func() {
		for _, n := range held {
			n.Add(-1)
		}
	}
	for _, s := range []struct {
		applies bool
		busy    *atomic.Int64
		share   float64
		over    prometheus.Counter
	}{
		{j.replay(), &d.replaying, d.cfg.ReplayShare, d.metrics.replaysDeferred},
		{j.attempt > 0, &d.retrying, d.cfg.RetryShare, d.metrics.retriesDeferred},
	} {
		if !s.applies {
			continue
		}
		if !takeSlot(s.busy, s.share, d.cfg.Workers) {
			release()
			return nil, s.over
		}
		held = append(held, s.busy)
	}
	return release, nil
}

// retryDeferral is how long a retry over the budget waits before it is
// offered to the scheduler again.
const retryDeferral = 100 * time.Millisecond

// takeSlot reserves one of the workers a kind of work may use at once
// (share of the pool, at least one), counted in busy.
func takeSlot(busy *atomic.Int64, share float64, workers int) bool {
	limit := max(1, int64(share*float64(workers)))
	for {
		n := busy.Load()
		if n >= limit {
			return false
		}
		if busy.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// replay reports whether j carries a replayed batch (parked.IsReplay).
func (j *job) replay() bool {
	for _, it := range j.batch.Items {
		if parked.IsReplay(it.ID) {
			return true
		}
	}
	return false
}

// attempt POSTs j once and settles it: acknowledged on success, parked when
// retrying cannot help or retries are exhausted, otherwise scheduled to be
// pushed again after a backoff, with no worker held while it waits.
func (d *Deliverer) attempt(j *job) schedule.Result {
	l := j.lane
	dest, keys := l.request()
	if j.body == nil {
		imps := make([]*ingestv1.Impression, 0, j.batch.Impressions)
		for _, it := range j.batch.Items {
			imps = append(imps, it.Value.batch.GetImpressions()...)
		}
		body, err := webhook.EncodeBody(imps)
		if err != nil {
			l.park(j, parked.Because(parked.Unencodable, "unencodable batch: %v", err))
			return schedule.Neutral
		}
		j.body = body
	}
	j.attempt++
	timeout := d.timeout(dest)
	d.metrics.inflightTotal.Inc()
	res := d.client.Send(context.Background(), webhook.Request{
		URL: dest.GetUrl(), ID: j.batch.ID, Body: j.body, Gzip: dest.GetGzip(),
		Secrets: keys, Timeout: timeout, SuccessCodes: dest.GetSuccessCodes(),
	})
	d.metrics.inflightTotal.Dec()
	d.outcome(l, j, res, timeout)
	d.metrics.observe(l.id, res)

	switch {
	case res.OK():
		for _, it := range j.batch.Items {
			l.ack(it.Value)
		}
		d.metrics.delivered.WithLabelValues(l.id).Add(float64(j.batch.Impressions))
		if float64(res.Latency) >= slowShare*float64(timeout) {
			return schedule.Slow
		}
		return schedule.OK
	case res.Gone:
		l.park(j, parked.Because(parked.Disabled, "HTTP %d: destination gone; disabled", res.Status))
		d.disable(dest, "410 Gone")
		return schedule.Neutral
	case res.Permanent():
		l.park(j, parked.Because(parked.Rejected, "HTTP %d: %v", res.Status, res.Err))
		return schedule.Neutral
	}
	delay := d.cfg.Retry.Delay(j.attempt, res.RetryAfter, nil)
	now := time.Now()
	lastTry := false
	if left := j.first.Add(d.cfg.Retry.MaxAge).Sub(now); res.RetryAfter > 0 && delay > left && left > 0 &&
		!d.cfg.Retry.Exhausted(j.attempt, j.first, now) {
		// A Retry-After reaching past the retry age would park the batch at
		// once, and a destination that mixes 200s with such 429s is never
		// quarantined, so nothing would replay it (F4b). Wait what is left
		// of the age instead and try a last time.
		delay, lastTry = left, true
	}
	if !lastTry && d.cfg.Retry.Exhausted(j.attempt, j.first, now.Add(delay)) {
		l.park(j, exhausted(j.attempt, res.Err))
		return schedule.Failure
	}
	d.metrics.retries.WithLabelValues(l.id).Inc()
	d.group.AfterFunc(delay, func() { d.requeue(j) }) // cancelled at shutdown: handBack returns j
	return schedule.Failure
}

// slowShare is the fraction of its timeout beyond which a 2xx counts as
// slow: the destination's in-flight cap shrinks instead of growing.
const slowShare = 0.5

// requeue pushes a batch back after its backoff. While the lane is full it
// tries again shortly; when the lane holds traffic the batch is parked.
func (d *Deliverer) requeue(j *job) {
	l := j.lane
	if reason, held := l.holding(); held {
		l.park(j, reason)
		return
	}
	err := d.sched.Push(l.id, l.tenant, j, max(j.batch.Impressions, 1))
	if err == schedule.ErrLaneFull {
		d.group.AfterFunc(50*time.Millisecond, func() { d.requeue(j) })
	}
	// ErrClosed: shutting down; handBack returns the messages.
}

// outcome publishes the attempt on imp.outcome.<dest> for the health monitor.
// It does not wait: outcomes are a signal, and delivery must not stall on it.
func (d *Deliverer) outcome(l *lane, j *job, res webhook.Result, timeout time.Duration) {
	subj, err := topology.Outcome(l.id)
	if err != nil {
		return
	}
	o := &eventv1.Outcome{
		DestinationId: l.id, TenantId: l.tenant, WebhookId: j.batch.ID, At: timestamppb.Now(),
		StatusCode: int32(res.Status), ErrorClass: res.Class,
		LatencyMs: float64(res.Latency.Microseconds()) / 1000, TimeoutMs: float64(timeout.Milliseconds()),
		Impressions: int32(j.batch.Impressions), Attempt: int32(j.attempt), RetryAfterMs: res.RetryAfter.Milliseconds(),
	}
	if res.Err != nil {
		o.Error = res.Err.Error()
	}
	data, err := proto.Marshal(o)
	if err != nil {
		return
	}
	if _, err := d.js.PublishAsync(subj, data); err != nil {
		d.metrics.outcomeLost.Inc()
	}
}

// disable turns a destination off after a 410 Gone, through the one write
// path of destination records. Its traffic is parked from then on until an
// operator enables it again.
func (d *Deliverer) disable(dest *adminv1.Destination, reason string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	kv, err := d.js.KeyValue(ctx, topology.BucketDestinations)
	if err != nil {
		d.log.Error("disable destination", "destination", dest.GetId(), "err", err)
		return
	}
	_, err = registry.UpdateDestination(ctx, kv, dest.GetId(), func(cur *adminv1.Destination) (bool, error) {
		if !cur.GetEnabled() {
			return false, nil
		}
		cur.Enabled, cur.DisabledReason, cur.Updated = false, reason, timestamppb.Now()
		return true, nil
	})
	if err != nil {
		d.log.Warn("disable destination", "destination", dest.GetId(), "err", err)
		return
	}
	d.log.Warn("destination disabled", "destination", dest.GetId(), "reason", reason)
}
