package health

import (
	"testing"
	"time"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Short names for the classes the tests use most.
const (
	ok        = eventv1.ErrorClass_ERROR_CLASS_UNSPECIFIED
	timeout   = eventv1.ErrorClass_ERROR_CLASS_TIMEOUT
	refused   = eventv1.ErrorClass_ERROR_CLASS_CONNECT
	server    = eventv1.ErrorClass_ERROR_CLASS_SERVER
	throttled = eventv1.ErrorClass_ERROR_CLASS_THROTTLED
	client    = eventv1.ErrorClass_ERROR_CLASS_CLIENT
	other     = eventv1.ErrorClass_ERROR_CLASS_OTHER
)

// epoch is the simulated clock's origin.
func epoch() time.Time { return time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC) }

// noJitter makes probe delays exact.
func noJitter() float64 { return 0.5 }

// newMachine returns a Machine with the default policy changed by edit (if
// not nil) and no jitter.
func newMachine(t testing.TB, edit func(*Policy)) *Machine {
	t.Helper()
	p := DefaultPolicy()
	if edit != nil {
		edit(&p)
	}
	m, err := New(p, noJitter)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return m
}

// outcome is an attempt on dest that finished at at with class, under a 10s
// timeout: timeouts take the whole timeout, everything else 50ms.
func outcome(dest string, class eventv1.ErrorClass, at time.Time) *eventv1.Outcome {
	o := &eventv1.Outcome{
		DestinationId: dest,
		TenantId:      "tenant-1",
		At:            timestamppb.New(at),
		ErrorClass:    class,
		LatencyMs:     50,
		TimeoutMs:     10_000,
		Attempt:       1,
	}
	switch class {
	case ok:
		o.StatusCode = 200
	case timeout:
		o.LatencyMs = 10_000
	case server:
		o.StatusCode = 503
	case throttled:
		o.StatusCode = 429
	case client:
		o.StatusCode = 400
	}
	return o
}

// decided is a decision and when it was made.
type decided struct {
	at  time.Time
	dec *eventv1.Decision
}

// observe feeds o to m at its own time and collects the decisions.
func observe(m *Machine, o *eventv1.Outcome, got *[]decided) {
	at := o.GetAt().AsTime()
	for _, d := range m.Observe(o, at) {
		*got = append(*got, decided{at, d})
	}
}

// mustDecision returns dest's decision in force.
func mustDecision(t *testing.T, m *Machine, dest string) *eventv1.Decision {
	t.Helper()
	d, err := m.Decision(dest)
	if err != nil {
		t.Fatalf("Decision(%s): %v", dest, err)
	}
	return d
}

// wantState fails unless dec is non-nil and in state want.
func wantState(t *testing.T, dec *eventv1.Decision, want eventv1.State) {
	t.Helper()
	if dec == nil {
		t.Fatalf("decision = nil, want %s", want)
	}
	if dec.GetState() != want {
		t.Fatalf("state = %s (%q), want %s", dec.GetState(), dec.GetReason(), want)
	}
}
