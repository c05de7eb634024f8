package audit

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/bulkhead-io/bulkhead/pkg/codec"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/natstest"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/testkit"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func setup(t *testing.T) (jetstream.JetStream, context.Context) {
	t.Helper()
	js := testkit.JetStream(t, stream.Limits{}).JS
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return js, ctx
}

// last decodes the last AUDIT record on subj into m.
func last(t *testing.T, ctx context.Context, js jetstream.JetStream, subj string, m proto.Message) {
	t.Helper()
	s, err := js.Stream(ctx, topology.StreamAudit)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := s.GetLastMsgForSubject(ctx, subj)
	if err != nil {
		t.Fatalf("no record on %s: %v", subj, err)
	}
	if err := codec.Decode(raw.Data, m); err != nil {
		t.Fatalf("record on %s is not protojson: %v: %s", subj, err, raw.Data)
	}
}

func count(t *testing.T, ctx context.Context, js jetstream.JetStream) uint64 {
	t.Helper()
	s, err := js.Stream(ctx, topology.StreamAudit)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}

func TestDecision(t *testing.T) {
	js, ctx := setup(t)
	d := &eventv1.Decision{
		DestinationId: "d1", TenantId: "t1", State: eventv1.State_STATE_QUARANTINED,
		Reason: "5 consecutive timeouts", Since: timestamppb.Now(), DecidedBy: "policy", Revision: 3,
	}
	if err := Decision(ctx, js, d); err != nil {
		t.Fatal(err)
	}
	var got eventv1.Decision
	last(t, ctx, js, "imp.audit.quarantine.d1", &got)
	if !proto.Equal(&got, d) {
		t.Errorf("audited %v, want %v", &got, d)
	}

	if err := Decision(ctx, js, &eventv1.Decision{DestinationId: "d1.>"}); !errors.Is(err, topology.ErrInvalidID) {
		t.Errorf("invalid destination: %v, want ErrInvalidID", err)
	}
	if n := count(t, ctx, js); n != 1 {
		t.Errorf("AUDIT holds %d records, want 1", n)
	}
}

func TestAdmin(t *testing.T) {
	at := timestamppb.New(time.Unix(1700000000, 0))
	for _, tc := range []struct {
		name    string
		rec     *eventv1.AuditRecord
		subj    string
		stamped bool
	}{
		{"tenant", &eventv1.AuditRecord{Actor: "ops", Action: "PauseTenant", TenantId: "t1", DestinationIds: []string{"d1", "d2"}, Reason: "maintenance", DryRun: true}, "imp.audit.admin.t1", true},
		{"no tenant", &eventv1.AuditRecord{Actor: "ops", Action: "PurgeParked", DestinationIds: []string{"gone"}}, "imp.audit.admin.all", true},
		{"time kept", &eventv1.AuditRecord{At: at, Actor: "ops", Action: "CreateDestination", TenantId: "t2"}, "imp.audit.admin.t2", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			js, ctx := setup(t)
			before := time.Now().Add(-time.Second)
			if err := Admin(ctx, js, proto.Clone(tc.rec).(*eventv1.AuditRecord)); err != nil {
				t.Fatal(err)
			}
			var got eventv1.AuditRecord
			last(t, ctx, js, tc.subj, &got)
			if tc.stamped {
				if got.GetAt() == nil || got.GetAt().AsTime().Before(before) {
					t.Errorf("At = %v, want stamped now", got.GetAt())
				}
				got.At = nil
			}
			if !proto.Equal(&got, tc.rec) {
				t.Errorf("audited %v, want %v", &got, tc.rec)
			}
		})
	}

	t.Run("invalid tenant", func(t *testing.T) {
		js, ctx := setup(t)
		if err := Admin(ctx, js, &eventv1.AuditRecord{TenantId: "t 1"}); !errors.Is(err, topology.ErrInvalidID) {
			t.Errorf("Admin = %v, want ErrInvalidID", err)
		}
		if n := count(t, ctx, js); n != 0 {
			t.Errorf("AUDIT holds %d records, want 0", n)
		}
	})
}

func TestNoStreamIsAnError(t *testing.T) {
	// Publishing waits for JetStream to store the record: with no AUDIT
	// stream there is nothing to store it, and the caller must hear so.
	_, js := natstest.Connect(t, natstest.RunJetStream(t))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := Decision(ctx, js, &eventv1.Decision{DestinationId: "d1"}); err == nil {
		t.Fatal("Decision without an AUDIT stream succeeded")
	}
}
