// Package audit publishes Bulkhead's audit trail on imp.audit.>: every
// decision about a destination and every mutating admin call, as protojson so
// an auditor can read them with `nats sub 'imp.audit.>'` or replay the AUDIT
// stream. Publishing waits for JetStream to store the record.
package audit

import (
	"context"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/bulkhead-io/bulkhead/pkg/codec"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

// Decision records d on imp.audit.quarantine.<dest>.
func Decision(ctx context.Context, js jetstream.JetStream, d *eventv1.Decision) error {
	subj, err := topology.AuditQuarantine(d.GetDestinationId())
	if err != nil {
		return err
	}
	return publish(ctx, js, subj, d)
}

// Admin records r on imp.audit.admin.<tenant> (or imp.audit.admin.all when the
// call concerns no single tenant), stamping the time when unset.
func Admin(ctx context.Context, js jetstream.JetStream, r *eventv1.AuditRecord) error {
	tenant := r.GetTenantId()
	if tenant == "" {
		tenant = "all"
	}
	subj, err := topology.AuditAdmin(tenant)
	if err != nil {
		return err
	}
	if r.At == nil {
		r.At = timestamppb.Now()
	}
	return publish(ctx, js, subj, r)
}

func publish(ctx context.Context, js jetstream.JetStream, subj string, m proto.Message) error {
	b, err := codec.Encode(m) // as the KV values: auditors read both the same way
	if err != nil {
		return err
	}
	if _, err := js.Publish(ctx, subj, b); err != nil {
		return fmt.Errorf("audit %s: %w", subj, err)
	}
	return nil
}
