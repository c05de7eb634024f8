// Package poll waits in tests for a condition instead of sleeping. It
// imports nothing but the standard library, so pure domain packages use it
// too.
package poll

import (
	"testing"
	"time"
)

// CheckFor calls fn every step until it returns nil, failing the test with
// fn's last error when total elapses first. Use it instead of sleeps.
func CheckFor(t testing.TB, total, step time.Duration, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(total)
	var err error
	for {
		if err = fn(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met in %v: %v", total, err)
		}
		time.Sleep(step)
	}
}
