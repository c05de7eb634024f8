package parked

import "testing"

// TestReasonText pins the stored park_reason texts: exports and the README
// show them, so a refactor must not change them.
func TestReasonText(t *testing.T) {
	for _, c := range []struct {
		r    Reason
		text string
		hold bool
	}{
		{Reason{Class: Quarantined}, "quarantined", true},
		{Reason{Class: Paused}, "paused", true},
		{Reason{Class: Disabled}, "destination disabled", true},
		{Reason{Class: Deleted}, "destination deleted", true},
		{Reason{Class: NoSecret}, "destination has no usable secret", true},
		{Because(Rejected, "HTTP %d: %s", 400, "bad"), "HTTP 400: bad", false},
		{Because(Exhausted, "retries exhausted after %d attempts", 3), "retries exhausted after 3 attempts", false},
	} {
		if got := c.r.String(); got != c.text || c.r.Class.Hold() != c.hold {
			t.Errorf("%v: %q hold=%v, want %q hold=%v", c.r.Class, got, c.r.Class.Hold(), c.text, c.hold)
		}
	}
	if Rejected.String() != "rejected" || Exhausted.String() != "retries exhausted" || Class(0).String() != "unknown" {
		t.Error("class labels changed")
	}
}
