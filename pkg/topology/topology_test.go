package topology

import (
	"errors"
	"strings"
	"testing"
)

func TestValidID(t *testing.T) {
	tests := []struct {
		id   string
		want bool
	}{
		{"demo", true},
		{"a", true},
		{"Tenant_1-x", true},
		{strings.Repeat("a", 64), true},
		{strings.Repeat("a", 65), false},
		{"", false},
		{"a.b", false},
		{"a*", false},
		{">", false},
		{"a b", false},
		{"é", false},
		{"a\n", false},
	}
	for _, tt := range tests {
		if got := ValidID(tt.id); got != tt.want {
			t.Errorf("ValidID(%q) = %v, want %v", tt.id, got, tt.want)
		}
	}
}

func TestBuildersRefuseInjection(t *testing.T) {
	builders := map[string]func(string) (string, error){
		"In": In, "Deliver": Deliver, "Parked": Parked, "Outcome": Outcome,
		"AuditQuarantine": AuditQuarantine, "AuditAdmin": AuditAdmin,
	}
	for name, build := range builders {
		for _, bad := range []string{"x.y", "*", ">", "", "x y"} {
			if s, err := build(bad); !errors.Is(err, ErrInvalidID) {
				t.Errorf("%s(%q) = %q, %v; want ErrInvalidID", name, bad, s, err)
			}
		}
	}
}

func TestSubjects(t *testing.T) {
	tests := []struct {
		build func(string) (string, error)
		want  string
	}{
		{In, "imp.in.d-1"},
		{Deliver, "imp.deliver.d-1"},
		{Parked, "imp.parked.d-1"},
		{Outcome, "imp.outcome.d-1"},
		{AuditQuarantine, "imp.audit.quarantine.d-1"},
		{AuditAdmin, "imp.audit.admin.d-1"},
	}
	for _, tt := range tests {
		got, err := tt.build("d-1")
		if err != nil || got != tt.want {
			t.Errorf("got %q, %v; want %q", got, err, tt.want)
		}
		id, err := IDFrom(got)
		if err != nil || id != "d-1" {
			t.Errorf("IDFrom(%q) = %q, %v", got, id, err)
		}
	}
	if _, err := IDFrom("imp.deliver.a*"); !errors.Is(err, ErrInvalidID) {
		t.Errorf("IDFrom accepted a wildcard: %v", err)
	}
}
