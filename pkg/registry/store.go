package registry

import (
	"context"
	"errors"

	"github.com/nats-io/nats.go/jetstream"

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
