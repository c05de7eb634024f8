// Package leaktest checks that a test package leaves no goroutine behind,
// allowing only the HTTP client's idle keep-alive connections, which close on
// their own timer after tests that talk to real HTTP receivers.
package leaktest

import (
	"testing"

	"go.uber.org/goleak"
)

// Options are the goleak options every Bulkhead test package uses.
func Options() []goleak.Option {
	return []goleak.Option{
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
	}
}

// VerifyTestMain runs the package's tests, then fails if goroutines leaked.
// Call it from TestMain.
func VerifyTestMain(m *testing.M) { goleak.VerifyTestMain(m, Options()...) }
