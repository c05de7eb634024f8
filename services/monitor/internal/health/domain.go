package health

import (
	"fmt"
	"maps"
	"net"
	"net/netip"
	"net/url"
	"slices"
	"time"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
)

// domain is one failure domain's members and recent trips.
type domain struct {
	members   map[string]*destination
	trips     []trip    // policy trips of members, oldest first
	trippedAt time.Time // when the domain last tripped as a whole
	// tenants whose destinations the last trip covers; nil: every tenant's
	// (trips came from at least Domain.MinTenants tenants).
	tenants map[string]bool
}

// trip is one member's policy trip.
type trip struct {
	dest string
	at   time.Time
}

// SetDomain puts a destination of tenant in a failure domain (a resolved
// network, host or DNS zone it shares with others), tracking it if it was
// unknown; an empty domain takes it out of any.
func (m *Machine) SetDomain(dest, tenant, domainKey string) {
	if dest == "" {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	d := m.dest(dest)
	if tenant != "" {
		d.tenant = tenant
	}
	if d.domain == domainKey {
		return
	}
	m.leaveDomain(d)
	if domainKey == "" {
		return
	}
	dom, ok := m.domains[domainKey]
	if !ok {
		dom = &domain{members: make(map[string]*destination)}
		m.domains[domainKey] = dom
	}
	dom.members[dest] = d
	d.domain = domainKey
}

// heldDomain returns d's domain when it tripped less than Domain.Within ago.
// m.mu must be held.
func (m *Machine) heldDomain(d *destination, now time.Time) (*domain, bool) {
	if !m.policy.Domain.Enabled || d.domain == "" {
		return nil, false
	}
	dom := m.domains[d.domain]
	if dom.trippedAt.IsZero() || now.Sub(dom.trippedAt) >= m.policy.Domain.Within {
		return nil, false
	}
	if dom.tenants != nil && !dom.tenants[d.tenant] {
		return nil, false // another tenant's trip: no evidence against this one
	}
	return dom, true
}

// correlate records that d tripped by policy at now and, when that trips
// d's failure domain, quarantines the domain's other destinations that are
// HEALTHY or RECOVERING with failures in their window. m.mu must be held.
func (m *Machine) correlate(d *destination, now time.Time) []*eventv1.Decision {
	dp := m.policy.Domain
	if !dp.Enabled || d.domain == "" {
		return nil
	}
	dom := m.domains[d.domain]
	dom.trips = slices.DeleteFunc(dom.trips, func(t trip) bool {
		_, member := dom.members[t.dest]
		return !member || now.Sub(t.at) > dp.Within
	})
	dom.trips = append(dom.trips, trip{dest: d.id, at: now})
	tripped := make(map[string]bool, len(dom.trips))
	tenants := map[string]bool{}
	for _, t := range dom.trips {
		tripped[t.dest] = true
		if mb, ok := dom.members[t.dest]; ok {
			tenants[mb.tenant] = true
		}
	}
	if len(tripped) < dp.MinTripped {
		return nil
	}
	// Trips of fewer than MinTenants tenants are evidence against those
	// tenants' destinations only: one tenant's broken endpoints on a shared
	// SaaS host say nothing of another tenant's there.
	scope := tenants
	if len(tenants) >= max(dp.MinTenants, 1) {
		scope = nil
	}
	inScope := func(mb *destination) bool { return scope == nil || scope[mb.tenant] }
	active := 0
	for _, mb := range dom.members {
		if inScope(mb) && mb.win != nil && mb.win.Counts(now).Attempts > 0 {
			active++
		}
	}
	if float64(len(tripped)) < dp.MinShare*float64(active) {
		return nil
	}
	dom.trippedAt, dom.tenants = now, scope
	reason := fmt.Sprintf("failure domain %s: %d of %d active destinations tripped within %v",
		d.domain, len(tripped), active, dp.Within)
	if scope != nil && slices.ContainsFunc(slices.Collect(maps.Values(dom.members)), func(mb *destination) bool { return !inScope(mb) }) {
		reason += fmt.Sprintf(" (of %d tenant(s); other tenants' destinations there are not held)", len(scope))
	}
	var out []*eventv1.Decision
	for _, id := range slices.Sorted(maps.Keys(dom.members)) {
		mb := dom.members[id]
		if !inScope(mb) {
			continue
		}
		if mb.state != eventv1.State_STATE_HEALTHY && mb.state != eventv1.State_STATE_RECOVERING {
			continue
		}
		if mb.win == nil || mb.win.Counts(now).hardFailures() == 0 {
			continue
		}
		out = append(out, m.quarantine(mb, reason, d.domain, now))
	}
	return out
}

// leaveDomain takes d out of its failure domain, dropping the domain when
// it empties. m.mu must be held.
func (m *Machine) leaveDomain(d *destination) {
	if d.domain == "" {
		return
	}
	if dom, ok := m.domains[d.domain]; ok {
		delete(dom.members, d.id)
		if len(dom.members) == 0 {
			delete(m.domains, d.domain)
		}
	}
	d.domain = ""
}

// DomainOf names the failure domain of a destination URL: its host name; for an
// IP literal, its /24 (IPv4) or /48 (IPv6) network. Loopback addresses keep
// their port, so local test endpoints are separate domains.
func DomainOf(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return ""
	}
	host := u.Hostname()
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return "host:" + host
	}
	if ip.IsLoopback() {
		return "local:" + net.JoinHostPort(host, u.Port())
	}
	bits := 24
	if ip.Is6() && !ip.Is4In6() {
		bits = 48
	}
	p, _ := ip.Unmap().Prefix(bits)
	return "net:" + p.String()
}
