// Package route decides where a tenant's batch goes: for each of the tenant's
// destinations, the impressions its filter wants, and whether they are
// delivered or parked.
package route

import (
	"slices"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
)

// Target is one destination's share of a batch.
type Target struct {
	DestinationID string
	// Park is true when the destination must not receive traffic now.
	Park bool
	// Reason says why it is parked.
	Reason      parked.Reason
	Impressions []*ingestv1.Impression
}

// Plan splits b across dests. state gives each destination's current state.
// Destinations whose filter matches none of the impressions get nothing.
func Plan(b *eventv1.Batch, dests []*adminv1.Destination, state func(id string) eventv1.State) []Target {
	out := make([]Target, 0, len(dests))
	for _, d := range dests {
		imps := matching(d.GetFilter(), b.GetImpressions())
		if len(imps) == 0 {
			continue
		}
		t := Target{DestinationID: d.GetId(), Impressions: imps}
		if c, held := registry.Hold(d, state(d.GetId())); held {
			t.Park, t.Reason = true, parked.Reason{Class: c}
		}
		out = append(out, t)
	}
	return out
}

// Only keeps the targets whose destination is in ids (a batch handed back
// for some of its destinations).
func Only(targets []Target, ids []string) []Target {
	out := targets[:0:0]
	for _, t := range targets {
		if slices.Contains(ids, t.DestinationID) {
			out = append(out, t)
		}
	}
	return out
}

// matching returns the impressions f wants. It returns imps itself (no copy)
// when the filter is empty, the common case.
func matching(f *adminv1.Filter, imps []*ingestv1.Impression) []*ingestv1.Impression {
	if len(f.GetSplits()) == 0 && len(f.GetEnvironmentIds()) == 0 {
		return imps
	}
	var out []*ingestv1.Impression
	for _, imp := range imps {
		if Matches(f, imp) {
			out = append(out, imp)
		}
	}
	return out
}

// Matches reports whether f wants imp: its split is listed (or no splits are)
// and its environment is listed (or no environments are).
func Matches(f *adminv1.Filter, imp *ingestv1.Impression) bool {
	return in(f.GetSplits(), imp.GetSplit()) && in(f.GetEnvironmentIds(), imp.GetEnvironmentId())
}

func in(list []string, v string) bool {
	if len(list) == 0 {
		return true
	}
	for _, x := range list {
		if x == v {
			return true
		}
	}
	return false
}
