package admin

import (
	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// WatchDecisions streams decisions as they are stored.
func (s *Server) WatchDecisions(req *adminv1.WatchDecisionsRequest, stream grpc.ServerStreamingServer[adminv1.WatchDecisionsResponse]) error {
	ctx := stream.Context()
	w, err := s.decisions.WatchAll(ctx, jetstream.UpdatesOnly())
	if err != nil {
		return toStatus(s.log, "watch decisions", err)
	}
	defer func() { _ = w.Stop() }()
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				return status.Error(codes.Unavailable, "decision watch ended; reconnect")
			}
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue
			}
			var d eventv1.Decision
			if err := registry.Decode(e.Value(), &d); err != nil {
				continue
			}
			if req.GetTenantId() != "" && d.GetTenantId() != req.GetTenantId() {
				continue
			}
			if err := stream.Send(&adminv1.WatchDecisionsResponse{Decision: &d}); err != nil {
				return err
			}
		}
	}
}
