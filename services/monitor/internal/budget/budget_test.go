package budget

import (
	"testing"

	"github.com/bulkhead-io/bulkhead/pkg/admission"
)

func tenants(m map[string]string) func(string) string { return func(d string) string { return m[d] } }

func TestTenantParkedBudget(t *testing.T) {
	l := Limits{TenantParked: 100}
	owner := tenants(map[string]string{"a1": "A", "a2": "A", "b1": "B"})
	// A's two destinations together reach its budget; B is far below.
	u := Usage{Parked: map[string]int64{"a1": 60, "a2": 40, "b1": 99}, TenantOf: owner}
	got := Decide(u, l, nil)
	if len(got) != 1 {
		t.Fatalf("refused %v, want only A", got)
	}
	r := got["A"]
	if r.Reason != admission.ReasonParkedBudget || r.Resource != TenantParked || r.Used != 100 || r.Limit != 100 {
		t.Errorf("A: %+v", r)
	}
	// Hysteresis: A stays refused until it is below 90 of its 100.
	u.Parked["a1"] = 51
	if got := Decide(u, l, got); got["A"].Resource != TenantParked {
		t.Errorf("at 91 of 100, after a refusal: %v; want still refused", got)
	}
	u.Parked["a1"] = 49
	if got := Decide(u, l, got); len(got) != 0 {
		t.Errorf("at 89 of 100: %v; want admitted", got)
	}
	// Without the earlier refusal, 91 is under budget.
	u.Parked["a1"] = 51
	if got := Decide(u, l, nil); len(got) != 0 {
		t.Errorf("at 91 of 100, never refused: %v", got)
	}
}

func TestDestinationHighWater(t *testing.T) {
	l := Limits{DestinationParked: 1000, HighWater: 0.9}
	u := Usage{Parked: map[string]int64{"a1": 899, "a2": 900, "b1": 10}, TenantOf: tenants(map[string]string{"a1": "A", "a2": "A", "b1": "B"})}
	got := Decide(u, l, nil)
	r, ok := got["A"]
	if !ok || len(got) != 1 || r.Resource != DestinationParked || r.Used != 900 || r.Limit != 1000 {
		t.Fatalf("refused %+v, want A for a2 at 900 of 1000", got)
	}
}

func TestDeletedDestinationsRefuseNobody(t *testing.T) {
	u := Usage{Parked: map[string]int64{"gone": 1 << 40}, TenantOf: tenants(nil)}
	if got := Decide(u, Limits{TenantParked: 1, DestinationParked: 1, HighWater: 0.5}, nil); len(got) != 0 {
		t.Errorf("refused %v for a destination no tenant owns", got)
	}
}

func TestFairShareUnderPressure(t *testing.T) {
	l := Limits{Pressure: 0.8}
	s := Stream{Name: "PARKED", Fill: 0.85, ByTenant: map[string]int64{"noisy": 900, "quiet": 10, "idle": 0}}
	got := Decide(Usage{TenantOf: tenants(nil), Streams: []Stream{s}}, l, nil)
	if len(got) != 1 || got["noisy"].Reason != admission.ReasonFairShare || got["noisy"].Resource != "share_of_PARKED" {
		t.Fatalf("refused %+v, want only noisy, for its share of PARKED", got)
	}
	// Below the pressure nobody is refused for a share.
	s.Fill = 0.79
	if got := Decide(Usage{TenantOf: tenants(nil), Streams: []Stream{s}}, l, nil); len(got) != 0 {
		t.Errorf("at 79%%: %v", got)
	}
	// ...unless refused for it already and not yet below 90 % of the pressure.
	if got2 := Decide(Usage{TenantOf: tenants(nil), Streams: []Stream{s}}, l, got); got2["noisy"].Resource != "share_of_PARKED" {
		t.Errorf("at 79%% after a refusal: %v; want still refused", got2)
	}
	s.Fill = 0.70
	if got2 := Decide(Usage{TenantOf: tenants(nil), Streams: []Stream{s}}, l, got); len(got2) != 0 {
		t.Errorf("at 70%% after a refusal: %v; want admitted", got2)
	}
	// Equal shares under pressure: everyone holding data is refused.
	s = Stream{Name: "DELIVERY", Fill: 0.9, ByTenant: map[string]int64{"a": 5, "b": 5}}
	if got := Decide(Usage{TenantOf: tenants(nil), Streams: []Stream{s}}, l, nil); len(got) != 2 {
		t.Errorf("equal shares of a full stream: refused %v, want both", got)
	}
}

func TestZeroLimitsRefuseNobody(t *testing.T) {
	u := Usage{Parked: map[string]int64{"a1": 1 << 40}, TenantOf: tenants(map[string]string{"a1": "A"}),
		Streams: []Stream{{Name: "PARKED", Fill: 1, ByTenant: map[string]int64{"A": 1 << 40}}}}
	if got := Decide(u, Limits{}, nil); len(got) != 0 {
		t.Errorf("refused %v with every rule off", got)
	}
}
