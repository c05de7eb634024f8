package admin

import (
	"context"
	"fmt"
	"sort"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
)

// tenantAction applies next to every destination of a tenant whose current
// state selects it, or only lists them on a dry run.
func (s *Server) tenantAction(ctx context.Context, action, tenant, reason string, dryRun bool, selected func(eventv1.State) bool, next func(*eventv1.Decision) *eventv1.Decision) ([]string, error) {
	dests, err := s.all(ctx, tenant)
	if err != nil {
		return nil, err
	}
	if len(dests) == 0 {
		return nil, toStatus(s.log, "tenant", fmt.Errorf("tenant %q has no destinations: %w", tenant, errNotFound))
	}
	var ids []string
	for _, d := range dests {
		prev, _, err := s.decision(ctx, d.GetId())
		if err != nil {
			return nil, err
		}
		if !selected(prev.GetState()) {
			continue
		}
		if !dryRun {
			if _, err := s.decide(ctx, d, next); err != nil {
				return ids, err
			}
		}
		ids = append(ids, d.GetId())
	}
	s.record(ctx, action, tenant, ids, reason, "", dryRun)
	return ids, nil
}

// PauseTenant pauses every destination of a tenant.
func (s *Server) PauseTenant(ctx context.Context, req *adminv1.PauseTenantRequest) (*adminv1.PauseTenantResponse, error) {
	ids, err := s.tenantAction(ctx, "PauseTenant", req.GetTenantId(), req.GetReason(), req.GetDryRun(),
		func(st eventv1.State) bool { return st != eventv1.State_STATE_PAUSED }, pause(actor(ctx), req.GetReason()))
	if err != nil {
		return nil, err
	}
	return &adminv1.PauseTenantResponse{DestinationIds: ids}, nil
}

// ResumeTenant resumes every paused destination of a tenant.
func (s *Server) ResumeTenant(ctx context.Context, req *adminv1.ResumeTenantRequest) (*adminv1.ResumeTenantResponse, error) {
	ids, err := s.tenantAction(ctx, "ResumeTenant", req.GetTenantId(), req.GetReason(), req.GetDryRun(),
		func(st eventv1.State) bool { return st == eventv1.State_STATE_PAUSED }, resume(actor(ctx), req.GetReason()))
	if err != nil {
		return nil, err
	}
	return &adminv1.ResumeTenantResponse{DestinationIds: ids}, nil
}

func sortStrings(s []string) []string {
	sort.Strings(s)
	return s
}
