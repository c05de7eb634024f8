package engine

import (
	"context"
	"errors"
	"sync"
	"time"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/services/monitor/internal/health"
)

// tick makes the time-driven transitions while leading: due probes, probe
// timeouts, and drained recoveries.
func (e *Engine) tick(ctx context.Context, m *health.Machine) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	var probes sync.WaitGroup
	defer probes.Wait()
	lastDrainCheck := time.Time{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := time.Now()
		for _, d := range m.Tick(now) {
			if !e.store(ctx, m, d) {
				continue
			}
			if d.GetState() == eventv1.State_STATE_PROBING {
				probes.Add(1)
				go func() {
					defer probes.Done()
					e.probe(ctx, m, d)
				}()
			}
		}
		if now.Sub(lastDrainCheck) >= time.Second {
			lastDrainCheck = now
			e.checkDrained(ctx, m, now)
		}
	}
}

// checkDrained marks RECOVERING destinations HEALTHY once everything parked
// before their recovery (plus the routers' grace) has been replayed.
func (e *Engine) checkDrained(ctx context.Context, m *health.Machine, now time.Time) {
	for _, dest := range e.reg.Destinations() {
		dec, err := m.Decision(dest.GetId())
		if err != nil || dec.GetState() != eventv1.State_STATE_RECOVERING {
			continue
		}
		since := dec.GetSince().AsTime()
		if now.Sub(since) < parked.ReplayGrace {
			continue
		}
		sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		n, oldest, err := parked.Stats(sctx, e.js, dest.GetId())
		cancel()
		if err != nil {
			continue
		}
		if n > 0 && !oldest.After(since.Add(parked.ReplayGrace)) {
			continue
		}
		if d, err := m.Drained(dest.GetId(), now); err == nil {
			e.store(ctx, m, d)
		}
	}
}

// store writes a decision to KV with compare-and-set and audits it. On a
// conflict (an operator decided in between) the stored decision wins and is
// loaded into the machine. It reports whether d was stored.
func (e *Engine) store(ctx context.Context, m *health.Machine, d *eventv1.Decision) bool {
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	cur, lastRev, err := registry.GetDecision(sctx, e.kv, d.GetDestinationId())
	if err != nil {
		e.log.Error("decision not stored", "destination", d.GetDestinationId(), "err", err)
		return false
	}
	if cur != nil && cur.GetRevision() >= d.GetRevision() {
		_ = m.Load(cur)
		return false
	}
	if dest := e.reg.Destination(d.GetDestinationId()); dest != nil && d.GetTenantId() == "" {
		d.TenantId = dest.GetTenantId()
	}
	switch _, err := registry.StoreDecision(sctx, e.js, e.kv, d, lastRev); {
	case errors.Is(err, registry.ErrAuditLost):
		e.log.Error("decision audit lost", "destination", d.GetDestinationId(), "err", err)
	case err != nil:
		e.log.Warn("decision not stored", "destination", d.GetDestinationId(), "err", err)
		return false
	}
	e.metrics.decisions.WithLabelValues(d.GetState().String()).Inc()
	e.log.Info("decision", "destination", d.GetDestinationId(), "state", d.GetState().String(),
		"reason", d.GetReason(), "revision", d.GetRevision(), "domain", d.GetDomain())
	return true
}
