package registry

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/bulkhead-io/bulkhead/pkg/audit"
	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

// Held reports whether traffic for a destination must be parked instead of
// delivered: it is quarantined, being probed or paused.
func Held(s eventv1.State) bool {
	switch s {
	case eventv1.State_STATE_QUARANTINED, eventv1.State_STATE_PROBING, eventv1.State_STATE_PAUSED:
		return true
	}
	return false
}

// ErrConflict is returned by PutDecision when the stored revision is not the
// one the caller read: someone else decided in between.
var ErrConflict = errors.New("decision changed concurrently")

// PutDecision stores d under its destination id if the key's KV revision is
// still lastRev (0: the key must not exist). It returns the new KV revision.
func PutDecision(ctx context.Context, kv jetstream.KeyValue, d *eventv1.Decision, lastRev uint64) (uint64, error) {
	if err := topology.CheckID(d.GetDestinationId()); err != nil {
		return 0, err
	}
	b, err := Encode(d)
	if err != nil {
		return 0, err
	}
	var rev uint64
	if lastRev == 0 {
		rev, err = kv.Create(ctx, d.GetDestinationId(), b)
	} else {
		rev, err = kv.Update(ctx, d.GetDestinationId(), b, lastRev)
	}
	if errors.Is(err, jetstream.ErrKeyExists) {
		return 0, ErrConflict
	}
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence {
		return 0, ErrConflict
	}
	return rev, err
}

// ErrAuditLost wraps the error of a decision that was stored but whose
// audit record could not be written. The decision is in force.
var ErrAuditLost = errors.New("decision stored, audit record lost")

// GetDecision returns the stored decision of dest and its KV revision; nil
// and 0 when none is stored (the destination is HEALTHY).
func GetDecision(ctx context.Context, kv jetstream.KeyValue, dest string) (*eventv1.Decision, uint64, error) {
	e, err := kv.Get(ctx, dest)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, err
	}
	var d eventv1.Decision
	if err := Decode(e.Value(), &d); err != nil {
		return nil, 0, err
	}
	return &d, e.Revision(), nil
}

// StoreDecision is the one write path of decisions, used by the monitor's
// machine and by operators alike: it stores d with compare-and-set against
// lastRev (ErrConflict when someone decided in between), then records it
// in AUDIT (invariant 3). An audit failure is returned wrapping
// ErrAuditLost, with the revision: the decision itself is in force.
func StoreDecision(ctx context.Context, js jetstream.JetStream, kv jetstream.KeyValue, d *eventv1.Decision, lastRev uint64) (uint64, error) {
	rev, err := PutDecision(ctx, kv, d, lastRev)
	if err != nil {
		return 0, err
	}
	// The decision is in force now: its record must not depend on the
	// caller still waiting.
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := audit.Decision(actx, js, d); err != nil {
		return rev, fmt.Errorf("%w: %v", ErrAuditLost, err)
	}
	return rev, nil
}

// ErrDestinationExists is returned by CreateDestination for an id in use.
var ErrDestinationExists = errors.New("destination exists")

// ErrDestinationNotFound is returned by UpdateDestination for an unknown id.
var ErrDestinationNotFound = errors.New("destination not found")

// CreateDestination stores a new destination record.
func CreateDestination(ctx context.Context, kv jetstream.KeyValue, d *adminv1.Destination) error {
	if err := topology.CheckID(d.GetId()); err != nil {
		return err
	}
	b, err := Encode(d)
	if err != nil {
		return err
	}
	if _, err := kv.Create(ctx, d.GetId(), b); errors.Is(err, jetstream.ErrKeyExists) {
		return ErrDestinationExists
	} else if err != nil {
		return err
	}
	return nil
}

// UpdateDestination is the one read-modify-write of a destination record,
// used by the admin API and by the deliverer's 410 handling: it reads the
// record, lets change edit it (change returns false to leave it as it is),
// and writes it back with compare-and-set (ErrConflict when it changed in
// between). It returns the record as stored, or as read when unchanged.
func UpdateDestination(ctx context.Context, kv jetstream.KeyValue, id string, change func(d *adminv1.Destination) (bool, error)) (*adminv1.Destination, error) {
	e, err := kv.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, ErrDestinationNotFound
	}
	if err != nil {
		return nil, err
	}
	var d adminv1.Destination
	if err := Decode(e.Value(), &d); err != nil {
		return nil, err
	}
	ok, err := change(&d)
	if err != nil || !ok {
		return &d, err
	}
	b, err := Encode(&d)
	if err != nil {
		return nil, err
	}
	if _, err := kv.Update(ctx, id, b, e.Revision()); err != nil {
		var apiErr *jetstream.APIError
		if errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence {
			return nil, ErrConflict
		}
		return nil, err
	}
	return &d, nil
}
