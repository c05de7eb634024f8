package keys

import (
	"errors"
	"testing"
)

func TestParseAndLookup(t *testing.T) {
	s, err := Parse([]string{"dev-key=demo", "other-key=t2", "third-key=demo"})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := s.Tenant("dev-key"); err != nil || got != "demo" {
		t.Errorf("Tenant(dev-key) = %q, %v", got, err)
	}
	if _, err := s.Tenant("nope-key"); !errors.Is(err, ErrUnknownKey) {
		t.Errorf("unknown key: %v", err)
	}
	if n := len(s.Tenants()); n != 2 {
		t.Errorf("Tenants = %d, want 2", n)
	}
}

func TestParseRefuses(t *testing.T) {
	for _, bad := range [][]string{{"novalue"}, {"short=t"}, {"long-enough=bad.tenant"}, {"long-enough="}} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
}
