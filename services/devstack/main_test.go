package main

import (
	"fmt"
	"strings"
	"testing"
)

// TestBannerNeverShowsConfiguredSecrets: the banner names the public
// development credentials, but only says where configured ones come from.
func TestBannerNeverShowsConfiguredSecrets(t *testing.T) {
	none := func(string) (string, bool) { return "", false }
	if got := fmt.Sprint(credentials(none)); !strings.Contains(got, "dev-key") || !strings.Contains(got, "dev-admin") {
		t.Fatalf("default banner %q does not name the development credentials", got)
	}
	env := map[string]string{"BULKHEAD_INGEST_API_KEYS": "s3cret-key=acme", "BULKHEAD_MONITOR_ADMIN_TOKENS": "ops:t0ken:operator"}
	set := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	got := fmt.Sprint(credentials(set))
	for _, secret := range []string{"s3cret", "t0ken", "dev-key", "dev-admin"} {
		if strings.Contains(got, secret) {
			t.Errorf("banner %q shows %q", got, secret)
		}
	}
}
