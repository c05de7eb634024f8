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

// Of returns the limits in force for d: its own, and the default for each
// it leaves unset (zero). It copies nothing, so the data plane can ask for
// every batch.
func (def DestinationDefaults) Of(d *adminv1.Destination) DestinationDefaults {
	if n := d.GetMaxBatchImpressions(); n != 0 {
		def.MaxBatchImpressions = n
	}
	if n := d.GetMaxBatchBytes(); n != 0 {
		def.MaxBatchBytes = n
	}
	if d.GetLinger() != nil {
		def.Linger = d.GetLinger().AsDuration()
	}
	if t := d.GetTimeout().AsDuration(); t != 0 {
		def.Timeout = t
	}
	return def
}

// Fill sets every limit d leaves unset (zero) to the default, as Of reads it.
func (def DestinationDefaults) Fill(d *adminv1.Destination) {
	in := def.Of(d)
	d.MaxBatchImpressions, d.MaxBatchBytes = in.MaxBatchImpressions, in.MaxBatchBytes
	d.Linger, d.Timeout = durationpb.New(in.Linger), durationpb.New(in.Timeout)
}
