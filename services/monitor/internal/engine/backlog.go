package engine

import (
	"context"
	"time"

	"github.com/bulkhead-io/bulkhead/pkg/parked"
)

// DefaultStallAfter is how long a backlog may go without moving before it
// is reported stalled: far above a healthy lane's repair time (two missed
// pull heartbeats, 4 s), well below the point where customers notice.
const DefaultStallAfter = 30 * time.Second

// watchBacklog reads what the shared streams hold: every destination's
// DELIVERY backlog feeds the stall tracker, and the shares of all three
// feed the budgets (account). It runs on each replica, so each one's admin
// API and metrics report stalls and budgets; it is the body of a loop every
// BacklogInterval.
func (e *Engine) watchBacklog(ctx context.Context) {
	rctx, cancel := context.WithTimeout(ctx, e.cfg.BacklogInterval)
	defer cancel()
	sh, err := e.readShares(rctx)
	if err != nil {
		e.log.Warn("read the shared streams", "err", err)
		return
	}
	e.checkStalls(time.Now(), sh.delivery.ByID)
	e.account(rctx, sh)
}

// checkStalls feeds a backlog snapshot to the stall tracker and reports
// what changed. A stall is Bulkhead's fault, so it is logged and measured,
// and never fed to the health machine.
func (e *Engine) checkStalls(now time.Time, backlog map[string]int64) {
	var total int64
	for _, n := range backlog {
		total += n
	}
	e.statsMu.Lock()
	stalled, resumed := e.stalls.Update(now, backlog, e.patience)
	n := e.stalls.Stalled()
	e.statsMu.Unlock()
	e.metrics.backlog.Set(float64(total))
	e.metrics.stalled.Set(float64(n))
	for _, id := range stalled {
		e.metrics.stalls.Inc()
		e.log.Error("delivery stalled: backlog not moving (a Bulkhead fault, not the endpoint's)",
			"destination", id, "backlog", backlog[id], "registered", e.reg.Destination(id) != nil)
	}
	for _, id := range resumed {
		e.log.Info("delivery moving again", "destination", id)
	}
}

// patience is the least time dest may go without progress before it counts
// as stalled: three of its request timeouts, since a hanging endpoint makes
// attempts that rare.
func (e *Engine) patience(dest string) time.Duration {
	if d := e.reg.Destination(dest); d != nil {
		return 3 * d.GetTimeout().AsDuration()
	}
	return 0
}

// watchParked exports how old each destination's oldest parked batch is,
// so data nearing the end of the export window (PARKED's MaxAge, after
// which JetStream deletes it) is seen and alarmed before it goes. Only
// destinations with parked data have a series. It is the body of a loop
// every ParkedInterval.
func (e *Engine) watchParked(ctx context.Context) {
	rctx, cancel := context.WithTimeout(ctx, e.cfg.ParkedInterval)
	defer cancel()
	sum, err := parked.Summary(rctx, e.js)
	if err != nil {
		e.log.Warn("read PARKED", "err", err)
		return
	}
	now := time.Now()
	var total int64
	var oldest time.Duration
	for id, b := range sum {
		total += b.Batches
		if b.Oldest.IsZero() {
			continue
		}
		age := now.Sub(b.Oldest)
		oldest = max(oldest, age)
		e.metrics.parkedAge.WithLabelValues(id).Set(age.Seconds())
	}
	for id := range e.parkedSeen {
		if _, ok := sum[id]; !ok {
			e.metrics.parkedAge.DeleteLabelValues(id)
		}
	}
	e.parkedSeen = sum
	e.metrics.parkedBatches.Set(float64(total))
	e.metrics.parkedOldest.Set(oldest.Seconds())
}
