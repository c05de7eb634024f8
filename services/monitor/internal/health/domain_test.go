package health

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
)

func TestFailureDomain(t *testing.T) {
	sec := func(s int) time.Duration { return time.Duration(s) * time.Second }
	tests := []struct {
		name     string
		edit     func(*Policy)
		members  int                        // a1..aN share domain net-a
		failFrom map[string]time.Duration   // time out every second from then on
		single   map[string][]time.Duration // one timeout at each of these times
		want     []string
	}{
		{
			name:     "three of six trip, the rest with failures follow",
			members:  6,
			failFrom: map[string]time.Duration{"a1": sec(31), "a2": sec(31), "a3": sec(31), "x1": sec(31)},
			single:   map[string][]time.Duration{"a4": {sec(30)}, "a5": {sec(40)}, "a6": {sec(70)}},
			want: []string{
				"a1@35s QUARANTINED", "a2@35s QUARANTINED", "a3@35s QUARANTINED",
				"a4@35s QUARANTINED net-a", // a recent failure: quarantined with the domain
				"a5@40s QUARANTINED net-a", // first failure while the domain is tripped
				"x1@35s QUARANTINED",       // outside the domain
				// a6's failure comes after the domain's 30s: ignored.
			},
		},
		{
			name:     "off",
			edit:     func(p *Policy) { p.Domain.Enabled = false },
			members:  6,
			failFrom: map[string]time.Duration{"a1": sec(31), "a2": sec(31), "a3": sec(31)},
			single:   map[string][]time.Duration{"a4": {sec(30)}, "a5": {sec(40)}},
			want:     []string{"a1@35s QUARANTINED", "a2@35s QUARANTINED", "a3@35s QUARANTINED"},
		},
		{
			name:     "trips more than 30s apart",
			members:  6,
			failFrom: map[string]time.Duration{"a1": sec(31), "a2": sec(46), "a3": sec(66)},
			single:   map[string][]time.Duration{"a4": {sec(65)}, "a5": {sec(75)}},
			want:     []string{"a1@35s QUARANTINED", "a2@50s QUARANTINED", "a3@1m10s QUARANTINED"},
		},
		{
			name:     "fewer than half of the active destinations",
			members:  8,
			failFrom: map[string]time.Duration{"a1": sec(31), "a2": sec(31), "a3": sec(31)},
			single:   map[string][]time.Duration{"a4": {sec(30)}, "a5": {sec(40)}},
			want:     []string{"a1@35s QUARANTINED", "a2@35s QUARANTINED", "a3@35s QUARANTINED"},
		},
		{
			name:     "configured for two trips",
			edit:     func(p *Policy) { p.Domain.MinTripped, p.Domain.MinShare = 2, 0.4 },
			members:  5,
			failFrom: map[string]time.Duration{"a1": sec(31), "a2": sec(31), "a3": sec(31)},
			single:   map[string][]time.Duration{"a4": {sec(30)}, "a5": {sec(40)}},
			want: []string{
				"a1@35s QUARANTINED", "a2@35s QUARANTINED",
				"a3@35s QUARANTINED net-a", "a4@35s QUARANTINED net-a", "a5@40s QUARANTINED net-a",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newMachine(t, tt.edit)
			var dests []string
			for i := range tt.members {
				dests = append(dests, fmt.Sprintf("a%d", i+1))
				m.SetDomain(dests[i], "tenant-1", "net-a")
			}
			dests = append(dests, "x1")
			m.SetDomain("x1", "tenant-1", "net-b")
			start := epoch()
			var got []string
			for s := range 90 {
				at := start.Add(sec(s))
				for _, id := range dests {
					if mustState(t, m, id) == eventv1.State_STATE_QUARANTINED {
						continue // its traffic is parked
					}
					class := ok
					if from, failing := tt.failFrom[id]; (failing && sec(s) >= from) || slices.Contains(tt.single[id], sec(s)) {
						class = timeout
					}
					for _, d := range m.Observe(outcome(id, class, at), at) {
						got = append(got, strings.TrimSpace(fmt.Sprintf("%s@%v %s %s",
							d.GetDestinationId(), sec(s), strings.TrimPrefix(d.GetState().String(), "STATE_"), d.GetDomain())))
					}
				}
			}
			slices.Sort(got)
			if !slices.Equal(got, tt.want) {
				t.Fatalf("decisions:\n got %q\nwant %q", got, tt.want)
			}
		})
	}
}

func TestFailureDomainReasons(t *testing.T) {
	m := newMachine(t, nil)
	for _, id := range []string{"a1", "a2", "a3", "a4", "a5"} {
		m.SetDomain(id, "tenant-1", "net-a")
	}
	start := epoch()
	var got []decided
	for s := range 30 {
		for _, id := range []string{"a1", "a2", "a3", "a4"} {
			observe(m, outcome(id, ok, start.Add(time.Duration(s)*time.Second)), &got)
		}
	}
	at := start.Add(30 * time.Second)
	observe(m, outcome("a4", refused, at), &got)
	for i := range 5 {
		at = start.Add(time.Duration(31+i) * time.Second)
		for _, id := range []string{"a1", "a2", "a3"} {
			observe(m, outcome(id, timeout, at), &got)
		}
	}
	if len(got) != 4 {
		t.Fatalf("got %d decisions, want 4", len(got))
	}
	a4 := got[3].dec
	if a4.GetDestinationId() != "a4" || a4.GetDomain() != "net-a" || a4.GetDecidedBy() != "policy" ||
		a4.GetReason() != "failure domain net-a: 3 of 4 active destinations tripped within 30s" {
		t.Fatalf("a4 decision = %v", a4)
	}
	// a5 had no traffic so far: not active, not quarantined; its first failure
	// while the domain is tripped quarantines it.
	held := m.Observe(outcome("a5", server, at.Add(3*time.Second)), at.Add(3*time.Second))
	if len(held) != 1 || held[0].GetReason() != "failure domain net-a tripped 3s ago" || held[0].GetDomain() != "net-a" {
		t.Fatalf("held decision = %v", held)
	}
	// 429s and permanent 4xx are not failures of the domain.
	m.SetDomain("a6", "tenant-1", "net-a")
	if d := m.Observe(outcome("a6", throttled, at), at); d != nil {
		t.Fatalf("429 in a tripped domain decided %v", d)
	}
	// The domain's probes keep the domain in their decisions.
	probes := m.Tick(at.Add(time.Minute))
	for _, p := range probes {
		wantDomain := ""
		if p.GetDestinationId() == "a4" || p.GetDestinationId() == "a5" {
			wantDomain = "net-a"
		}
		if p.GetState() != eventv1.State_STATE_PROBING || p.GetDomain() != wantDomain {
			t.Fatalf("probe decision = %v", p)
		}
	}
}

func TestSetDomainMovesAndForgetLeaves(t *testing.T) {
	m := newMachine(t, nil)
	m.SetDomain("a1", "tenant-1", "net-a")
	m.SetDomain("a1", "tenant-1", "net-b")
	m.SetDomain("a2", "tenant-1", "net-b")
	m.SetDomain("a2", "tenant-1", "")
	m.Forget("a1")
	m.Forget("nope")
	if len(m.domains) != 0 {
		t.Fatalf("domains left: %v", m.domains)
	}
	if _, err := m.Decision("a2"); err != nil {
		t.Fatalf("a2 forgotten by leaving its domain: %v", err)
	}
}

// mustState returns dest's state, HEALTHY when it is not tracked yet.
func mustState(t *testing.T, m *Machine, dest string) eventv1.State {
	t.Helper()
	d, err := m.Decision(dest)
	if err != nil {
		return eventv1.State_STATE_HEALTHY
	}
	return d.GetState()
}

func TestDomainOf(t *testing.T) {
	for url, want := range map[string]string{
		"https://hooks.example.com/a?x=1": "host:hooks.example.com",
		"http://203.0.113.7:8080/hook":    "net:203.0.113.0/24",
		"http://[2001:db8::1]/h":          "net:2001:db8::/48",
		"http://127.0.0.1:9001/h":         "local:127.0.0.1:9001",
		"::not a url":                     "",
	} {
		if got := DomainOf(url); got != want {
			t.Errorf("DomainOf(%q) = %q, want %q", url, got, want)
		}
	}
}

// TestFailureDomainStaysWithinATenant: on a shared host, one tenant's three
// destinations fail and trip the domain. Only that tenant's destinations
// there are quarantined: another tenant's destination on the same host,
// failing once during the trip, is judged on its own. When destinations of
// two tenants trip, the domain holds everyone's.
func TestFailureDomainStaysWithinATenant(t *testing.T) {
	for _, tt := range []struct {
		name       string
		tenantOfA3 string
		wantOtherQ bool
	}{
		{"one tenant trips", "tenant-A", false},
		{"two tenants trip", "tenant-C", true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			m := newMachine(t, nil)
			tenant := map[string]string{"a1": "tenant-A", "a2": "tenant-A", "a3": tt.tenantOfA3, "b1": "tenant-B"}
			for id, tn := range tenant {
				m.SetDomain(id, tn, "host:saas.example")
			}
			start := epoch()
			var got []decided
			for s := range 30 {
				for id := range tenant {
					observe(m, outcomeOf(id, tenant[id], ok, start.Add(time.Duration(s)*time.Second)), &got)
				}
			}
			for i := range 6 {
				at := start.Add(time.Duration(31+i) * time.Second)
				for _, id := range []string{"a1", "a2", "a3"} {
					if mustState(t, m, id) != eventv1.State_STATE_QUARANTINED {
						observe(m, outcomeOf(id, tenant[id], timeout, at), &got)
					}
				}
			}
			// b1 fails once while the domain is tripped.
			at := start.Add(40 * time.Second)
			observe(m, outcomeOf("b1", "tenant-B", timeout, at), &got)
			if q := mustState(t, m, "b1") == eventv1.State_STATE_QUARANTINED; q != tt.wantOtherQ {
				t.Errorf("b1 (another tenant) quarantined = %v, want %v; decisions %v", q, tt.wantOtherQ, got)
			}
			for _, id := range []string{"a1", "a2", "a3"} {
				if mustState(t, m, id) != eventv1.State_STATE_QUARANTINED {
					t.Errorf("%s not quarantined", id)
				}
			}
		})
	}
}

func outcomeOf(dest, tenant string, class eventv1.ErrorClass, at time.Time) *eventv1.Outcome {
	o := outcome(dest, class, at)
	o.TenantId = tenant
	return o
}
