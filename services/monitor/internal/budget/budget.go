// Package budget decides which tenants ingest must refuse, from what each
// tenant and destination holds in the shared streams. It is pure: the
// monitor reads the streams and stores the refusals; this package only
// counts and compares, so every rule is tested without NATS.
//
// Every shared stream is divided into shares. JetStream enforces the
// per-subject ones itself (a tenant's batches in IMPRESSIONS, a
// destination's in DELIVERY and PARKED), so they hold however late the
// monitor is. What JetStream cannot count (a tenant's parked batches over
// all its destinations, a share of a stream that is nearly full) is counted
// here, and its consequence is the tenant being refused at ingest: the
// worst a tenant can do is fill its own share, and it is told so.
package budget

import (
	"fmt"
	"sort"

	"github.com/bulkhead-io/bulkhead/pkg/admission"
)

// The resources, as named in eventv1.Budget.
const (
	DeliveryBacklog     = "delivery_backlog"      // a destination's batches in DELIVERY
	DestinationParked   = "destination_parked"    // a destination's batches in PARKED
	TenantParked        = "tenant_parked"         // a tenant's batches in PARKED
	TenantIngestBacklog = "tenant_ingest_backlog" // a tenant's batches in IMPRESSIONS
)

// Limits are the budgets. Zero disables a rule.
type Limits struct {
	// TenantParked is the most batches a tenant may hold in PARKED over all
	// of its destinations before it is refused.
	TenantParked int64
	// DestinationParked is PARKED's per-destination limit (JetStream's). A
	// tenant is refused once one of its destinations holds HighWater of it,
	// so the limit itself is not reached while the monitor runs.
	DestinationParked int64
	// HighWater is that fraction, 0..1.
	HighWater float64
	// Pressure is the fraction of a shared stream's bytes beyond which every
	// tenant holding more than an equal share of it is refused.
	Pressure float64
}

// DefaultLimits let a tenant park 100,000 batches; it is refused at 90 %
// of a destination's hard limit, and at 80 % of a stream's bytes if it
// holds more than its share.
func DefaultLimits() Limits {
	return Limits{TenantParked: 100000, HighWater: 0.9, Pressure: 0.8}
}

// Stream is one shared stream's fill and each tenant's share of it.
type Stream struct {
	Name     string
	Fill     float64          // bytes held / MaxBytes
	ByTenant map[string]int64 // batches by tenant
}

// Usage is what the shared streams hold now.
type Usage struct {
	// Parked counts each destination's batches in PARKED.
	Parked map[string]int64
	// TenantOf names a destination's tenant ("" for one no longer registered).
	TenantOf func(dest string) string
	// Streams are the shared streams whose fill is watched.
	Streams []Stream
}

// Refusal is why a tenant is refused: the reason callers receive
// (admission.Reason*), the resource and its use and limit, and in words.
type Refusal struct {
	Tenant   string
	Reason   string
	Resource string
	Used     int64
	Limit    int64
	Detail   string
}

// release is the fraction of the limit a tenant must fall below before a
// refusal is lifted: without it a tenant at its limit would flap between
// refused and admitted on every batch parked or replayed.
const release = 0.9

// Decide returns the tenants to refuse now. refused are those refused
// until now, for hysteresis: a tenant stays refused until its use is below
// release of the limit that refused it (for a stream's fair share, until
// the stream is below release of the pressure).
func Decide(u Usage, l Limits, refused map[string]Refusal) map[string]Refusal {
	out := map[string]Refusal{}
	was := func(tenant, resource string) bool {
		r, ok := refused[tenant]
		return ok && r.Resource == resource
	}
	over := func(tenant, resource string, used, limit int64) bool {
		if limit <= 0 {
			return false
		}
		if was(tenant, resource) {
			return float64(used) >= release*float64(limit)
		}
		return used >= limit
	}
	set := func(r Refusal) {
		if _, ok := out[r.Tenant]; !ok {
			out[r.Tenant] = r
		}
	}

	// A tenant's parked batches, and its fullest destination's.
	parked := map[string]int64{}
	fullest := map[string]string{}
	for dest, n := range u.Parked {
		t := u.TenantOf(dest)
		if t == "" {
			continue // deleted: its data stays exportable, no tenant to refuse
		}
		parked[t] += n
		if f, ok := fullest[t]; !ok || n > u.Parked[f] || n == u.Parked[f] && dest < f {
			fullest[t] = dest
		}
	}
	for _, t := range sorted(parked) {
		if d := fullest[t]; l.DestinationParked > 0 && l.HighWater > 0 {
			hw := int64(l.HighWater * float64(l.DestinationParked))
			if over(t, DestinationParked, u.Parked[d], max(hw, 1)) {
				set(Refusal{Tenant: t, Reason: admission.ReasonParkedBudget, Resource: DestinationParked,
					Used: u.Parked[d], Limit: l.DestinationParked,
					Detail: fmt.Sprintf("destination %s holds %d parked batches; its limit is %d", d, u.Parked[d], l.DestinationParked)})
			}
		}
		if over(t, TenantParked, parked[t], l.TenantParked) {
			set(Refusal{Tenant: t, Reason: admission.ReasonParkedBudget, Resource: TenantParked,
				Used: parked[t], Limit: l.TenantParked,
				Detail: fmt.Sprintf("the tenant's destinations hold %d parked batches; its budget is %d", parked[t], l.TenantParked)})
		}
	}

	// Fair shares of a stream under pressure.
	if l.Pressure > 0 {
		for _, s := range u.Streams {
			resource := "share_of_" + s.Name
			var total, users int64
			for _, n := range s.ByTenant {
				if n > 0 {
					total += n
					users++
				}
			}
			if users == 0 {
				continue
			}
			fair := (total + users - 1) / users
			for _, t := range sorted(s.ByTenant) {
				n := s.ByTenant[t]
				pressed := s.Fill >= l.Pressure || was(t, resource) && s.Fill >= release*l.Pressure
				if pressed && n > 0 && n >= fair {
					set(Refusal{Tenant: t, Reason: admission.ReasonFairShare, Resource: resource, Used: n, Limit: fair,
						Detail: fmt.Sprintf("%s is %.0f%% full and the tenant holds %d of its %d batches, more than an equal share of %d",
							s.Name, 100*s.Fill, n, total, fair)})
				}
			}
		}
	}
	return out
}

func sorted[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
