package engine

import (
	"context"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/bulkhead-io/bulkhead/pkg/admission"
	"github.com/bulkhead-io/bulkhead/pkg/audit"
	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/bulkhead-io/bulkhead/services/monitor/internal/budget"
)

// shares is what the shared streams held at the last read: every
// replica's admin API reports budgets from it, and the leader refuses
// tenants from it.
type shares struct {
	impressions, delivery   stream.Shares
	parked                  stream.Shares
	tenantParked            map[string]int64 // by tenant, over its destinations
	tenantDelivery          map[string]int64
	destinationsOverBacklog map[string]bool
}

// readShares reads the three shared streams, one stream-info request each.
func (e *Engine) readShares(ctx context.Context) (*shares, error) {
	sh := &shares{tenantParked: map[string]int64{}, tenantDelivery: map[string]int64{}, destinationsOverBacklog: map[string]bool{}}
	for _, r := range []struct {
		name, filter string
		into         *stream.Shares
	}{
		{topology.StreamImpressions, topology.AllIn, &sh.impressions},
		{topology.StreamDelivery, topology.AllDeliver, &sh.delivery},
		{topology.StreamParked, topology.AllParked, &sh.parked},
	} {
		s, err := e.js.Stream(ctx, r.name)
		if err != nil {
			return nil, err
		}
		if *r.into, err = stream.PerSubject(ctx, s, r.filter); err != nil {
			return nil, err
		}
	}
	for id, n := range sh.parked.ByID {
		if d := e.reg.Destination(id); d != nil {
			sh.tenantParked[d.GetTenantId()] += n
		}
	}
	for id, n := range sh.delivery.ByID {
		if d := e.reg.Destination(id); d != nil {
			sh.tenantDelivery[d.GetTenantId()] += n
		}
		if lim := sh.delivery.PerSubjectLimit; lim > 0 && n >= lim {
			sh.destinationsOverBacklog[id] = true
		}
	}
	return sh, nil
}

// account records a snapshot: gauges and audit of destinations newly over
// their DELIVERY budget on every replica's metrics, and, on the leader,
// the refusals ingest enforces.
func (e *Engine) account(ctx context.Context, sh *shares) {
	e.statsMu.Lock()
	prev := e.shares
	e.shares = sh
	e.statsMu.Unlock()
	e.metrics.overBudget.Set(float64(len(sh.destinationsOverBacklog)))
	if e.leading() == nil {
		return
	}
	for id := range sh.destinationsOverBacklog {
		if prev != nil && prev.destinationsOverBacklog[id] {
			continue
		}
		d := e.reg.Destination(id)
		e.log.Warn("destination's DELIVERY backlog at its budget: its new batches are parked", "destination", id,
			"backlog", sh.delivery.ByID[id], "limit", sh.delivery.PerSubjectLimit)
		e.auditBudget(ctx, d.GetTenantId(), "DestinationOverBudget", []string{id}, "DELIVERY backlog at its budget; new batches are parked (delivery backlog over budget)")
	}
	e.enforce(ctx, sh)
}

// usage is sh as package budget sees it.
func (e *Engine) usage(sh *shares) budget.Usage {
	return budget.Usage{
		Parked: sh.parked.ByID,
		TenantOf: func(dest string) string {
			return e.reg.Destination(dest).GetTenantId() // "" when deleted
		},
		Streams: []budget.Stream{
			{Name: topology.StreamImpressions, Fill: sh.impressions.Fill(), ByTenant: sh.impressions.ByID},
			{Name: topology.StreamDelivery, Fill: sh.delivery.Fill(), ByTenant: sh.tenantDelivery},
			{Name: topology.StreamParked, Fill: sh.parked.Fill(), ByTenant: sh.tenantParked},
		},
	}
}

// enforce stores the refusals package budget decides and lifts the others,
// each change audited. Only the leader calls it.
func (e *Engine) enforce(ctx context.Context, sh *shares) {
	limits := e.cfg.Budgets
	limits.DestinationParked = sh.parked.PerSubjectLimit
	now := map[string]budget.Refusal{}
	for tenant, r := range e.admission.All() {
		now[tenant] = budget.Refusal{Tenant: tenant, Reason: r.GetReason(), Resource: r.GetBudget().GetResource()}
	}
	decided := budget.Decide(e.usage(sh), limits, now)
	for tenant, r := range decided {
		if old, ok := now[tenant]; ok && old.Reason == r.Reason && old.Resource == r.Resource {
			continue
		}
		rec := &eventv1.Refusal{
			TenantId: tenant, Reason: r.Reason, Detail: r.Detail, Since: timestamppb.Now(),
			RetryAfterMs: refusalRetry.Milliseconds(),
			Budget:       &eventv1.Budget{Resource: r.Resource, Scope: "tenant", Used: r.Used, Limit: r.Limit, Unit: "batches", Exhausted: true},
		}
		if err := admission.Store(ctx, e.admissionKV, rec); err != nil {
			e.log.Warn("store refusal", "tenant", tenant, "err", err)
			continue
		}
		e.metrics.refusals.WithLabelValues(r.Reason).Inc()
		e.log.Warn("tenant refused at ingest: a budget is spent", "tenant", tenant, "reason", r.Reason, "detail", r.Detail)
		e.auditBudget(ctx, tenant, "TenantRefused", nil, r.Reason+": "+r.Detail)
	}
	for tenant := range now {
		if _, ok := decided[tenant]; ok {
			continue
		}
		if err := admission.Lift(ctx, e.admissionKV, tenant); err != nil {
			e.log.Warn("lift refusal", "tenant", tenant, "err", err)
			continue
		}
		e.log.Info("tenant admitted again: back under budget", "tenant", tenant)
		e.auditBudget(ctx, tenant, "TenantAdmitted", nil, "back under budget")
	}
	byReason := map[string]int{}
	for _, r := range decided {
		byReason[r.Reason]++
	}
	for _, reason := range []string{admission.ReasonParkedBudget, admission.ReasonFairShare} {
		e.metrics.refused.WithLabelValues(reason).Set(float64(byReason[reason]))
	}
}

// refusalRetry is the delay a refused tenant is advised to wait: a budget
// is re-read every BacklogInterval, and one spent by parked data frees only
// when it is replayed, exported or purged.
const refusalRetry = 30 * time.Second

func (e *Engine) auditBudget(ctx context.Context, tenant, action string, dests []string, detail string) {
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := audit.Admin(actx, e.js, &eventv1.AuditRecord{
		Actor: "monitor", Action: action, TenantId: tenant, DestinationIds: dests, Detail: detail,
	}); err != nil {
		e.log.Warn("audit", "action", action, "tenant", tenant, "err", err)
	}
}

// Budgets returns d's shares of the shared streams and its tenant's, as of
// the last read (at most a BacklogInterval old), and the tenant's refusal.
func (e *Engine) Budgets(d *adminv1.Destination) ([]*eventv1.Budget, *eventv1.Refusal) {
	e.statsMu.Lock()
	sh := e.shares
	e.statsMu.Unlock()
	refusal := e.admission.Refusal(d.GetTenantId())
	if sh == nil {
		return nil, refusal
	}
	id, tenant := d.GetId(), d.GetTenantId()
	b := func(resource, scope string, used, limit int64, exhausted bool) *eventv1.Budget {
		return &eventv1.Budget{Resource: resource, Scope: scope, Used: used, Limit: limit, Unit: "batches",
			Exhausted: exhausted || limit > 0 && used >= limit}
	}
	refusedFor := func(resource string) bool { return refusal.GetBudget().GetResource() == resource }
	return []*eventv1.Budget{
		b(budget.DeliveryBacklog, "destination", sh.delivery.ByID[id], sh.delivery.PerSubjectLimit, false),
		b(budget.DestinationParked, "destination", sh.parked.ByID[id], sh.parked.PerSubjectLimit, refusedFor(budget.DestinationParked)),
		b(budget.TenantParked, "tenant", sh.tenantParked[tenant], e.cfg.Budgets.TenantParked, refusedFor(budget.TenantParked)),
		b(budget.TenantIngestBacklog, "tenant", sh.impressions.ByID[tenant], sh.impressions.PerSubjectLimit, false),
	}, refusal
}
