package admin

import (
	"context"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

func toRange(r *adminv1.TimeRange) parked.Range {
	var out parked.Range
	if r.GetStart() != nil {
		out.Start = r.GetStart().AsTime()
	}
	if r.GetEnd() != nil {
		out.End = r.GetEnd().AsTime()
	}
	return out
}

// ReplayParked moves parked batches back to delivery. The destination must be
// able to receive them (HEALTHY or RECOVERING); otherwise they would only be
// parked again.
func (s *Server) ReplayParked(ctx context.Context, req *adminv1.ReplayParkedRequest) (*adminv1.ReplayParkedResponse, error) {
	d, _, err := s.load(ctx, req.GetId())
	if err != nil {
		return nil, err
	}
	dec, _, err := s.decision(ctx, d.GetId())
	if err != nil {
		return nil, err
	}
	if registry.Held(dec.GetState()) || !d.GetEnabled() {
		return nil, status.Errorf(codes.FailedPrecondition, "destination %q is %s (enabled=%v); resume it before replaying",
			d.GetId(), dec.GetState(), d.GetEnabled())
	}
	rate := float64(req.GetRate())
	if rate == 0 {
		rate = s.defaults.ReplayRate
	}
	b, n, err := parked.Replay(ctx, s.js, d.GetId(), parked.ReplayOptions{Range: toRange(req.GetRange()), Rate: rate, MaxRate: rate})
	s.record(ctx, "ReplayParked", d.GetTenantId(), []string{d.GetId()}, "", formatCount(b, n), false)
	if err != nil {
		if ctx.Err() != nil {
			return nil, status.Errorf(codes.DeadlineExceeded, "replayed %d batches before the deadline; call again to continue", b)
		}
		return nil, toStatus(s.log, "replay", err)
	}
	return &adminv1.ReplayParkedResponse{Batches: b, Impressions: n}, nil
}

// ExportParked streams a destination's parked impressions, oldest first. It
// works for deleted destinations too: their data stays for the export window.
func (s *Server) ExportParked(req *adminv1.ExportParkedRequest, stream grpc.ServerStreamingServer[adminv1.ExportParkedResponse]) error {
	ctx := stream.Context()
	err := parked.Each(ctx, s.js, req.GetId(), toRange(req.GetRange()), 0, func(m parked.Msg) error {
		return stream.Send(&adminv1.ExportParkedResponse{
			BatchId: m.Batch.GetBatchId(), ParkedAt: timestamppb.New(m.Stored),
			ParkReason: m.Batch.GetParkReason(), Impressions: m.Batch.GetImpressions(),
		})
	})
	if err != nil && ctx.Err() == nil {
		if _, ok := status.FromError(err); ok {
			return err
		}
		return toStatus(s.log, "export", err)
	}
	return ctx.Err()
}

// PurgeParked deletes parked batches; audited, and countable with dry_run first.
func (s *Server) PurgeParked(ctx context.Context, req *adminv1.PurgeParkedRequest) (*adminv1.PurgeParkedResponse, error) {
	n, err := parked.Purge(ctx, s.js, req.GetId(), toRange(req.GetRange()), req.GetDryRun())
	tenant := ""
	if d, _, lerr := s.load(ctx, req.GetId()); lerr == nil {
		tenant = d.GetTenantId()
	}
	s.record(ctx, "PurgeParked", tenant, []string{req.GetId()}, req.GetReason(), formatCount(n, -1), req.GetDryRun())
	if err != nil {
		return nil, toStatus(s.log, "purge", err)
	}
	return &adminv1.PurgeParkedResponse{Batches: n}, nil
}
