package registry

import (
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	"github.com/bulkhead-io/bulkhead/pkg/webhook"
)

// DestinationDefaults are the limits a destination gets when it leaves them
// unset: the one home of these values. The admin API fills them into the
// record it stores, so what an operator reads is what is applied; the
// deliverer applies the same built-in values to a record that lacks them
// (written by hand, or by an older version).
type DestinationDefaults struct {
	// MaxBatchImpressions bounds the impressions of one POST.
	MaxBatchImpressions int32
	// MaxBatchBytes bounds the body of one POST.
	MaxBatchBytes int32
	// Linger is how long a partial batch waits for company.
	Linger time.Duration
	// Timeout bounds one POST.
	Timeout time.Duration
}

// DefaultDestination returns the built-in destination defaults.
func DefaultDestination() DestinationDefaults {
	return DestinationDefaults{MaxBatchImpressions: 500, MaxBatchBytes: 1 << 20, Linger: 200 * time.Millisecond, Timeout: webhook.DefaultTimeout}
}

// Fill sets every limit d leaves unset (zero) to the default.
func (def DestinationDefaults) Fill(d *adminv1.Destination) {
	if d.GetMaxBatchImpressions() == 0 {
		d.MaxBatchImpressions = def.MaxBatchImpressions
	}
	if d.GetMaxBatchBytes() == 0 {
		d.MaxBatchBytes = def.MaxBatchBytes
	}
	if d.GetLinger() == nil {
		d.Linger = durationpb.New(def.Linger)
	}
	if d.GetTimeout().AsDuration() == 0 {
		d.Timeout = durationpb.New(def.Timeout)
	}
}
