package admin

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/protobuf/types/known/timestamppb"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
)

// decision returns the stored decision of a destination (nil when none) and
// its KV revision (0 when none).
func (s *Server) decision(ctx context.Context, id string) (*eventv1.Decision, uint64, error) {
	d, rev, err := registry.GetDecision(ctx, s.decisions, id)
	if err != nil {
		return nil, 0, toStatus(s.log, "get decision", err)
	}
	return d, rev, nil
}

// decide applies an operator transition with compare-and-set, so it never
// overwrites a decision the monitor made in between unseen; it retries a few
// times on conflict. next returns nil when nothing needs to change.
func (s *Server) decide(ctx context.Context, d *adminv1.Destination, next func(prev *eventv1.Decision) *eventv1.Decision) (*eventv1.Decision, error) {
	for range 5 {
		prev, rev, err := s.decision(ctx, d.GetId())
		if err != nil {
			return nil, err
		}
		n := next(prev)
		if n == nil {
			return prev, nil
		}
		n.DestinationId, n.TenantId = d.GetId(), d.GetTenantId()
		n.Since = timestamppb.Now()
		n.Revision = prev.GetRevision() + 1
		switch _, err := registry.StoreDecision(ctx, s.js, s.decisions, n, rev); {
		case errors.Is(err, registry.ErrConflict):
			continue
		case errors.Is(err, registry.ErrAuditLost):
			s.log.Error("decision audit lost", "destination", n.GetDestinationId(), "err", err)
		case err != nil:
			return nil, toStatus(s.log, "store decision", err)
		}
		return n, nil
	}
	return nil, toStatus(s.log, "store decision", fmt.Errorf("destination %q: decisions changing too fast: %w", d.GetId(), errConflict))
}

func pause(actorName, reason string) func(*eventv1.Decision) *eventv1.Decision {
	return func(prev *eventv1.Decision) *eventv1.Decision {
		if prev.GetState() == eventv1.State_STATE_PAUSED {
			return nil
		}
		return &eventv1.Decision{State: eventv1.State_STATE_PAUSED, Reason: "operator: " + reason, DecidedBy: "operator:" + actorName}
	}
}

// resume lifts a pause or a quarantine. The destination goes to RECOVERING so
// its parked backlog replays; the monitor marks it HEALTHY once drained.
func resume(actorName, reason string) func(*eventv1.Decision) *eventv1.Decision {
	return func(prev *eventv1.Decision) *eventv1.Decision {
		if !registry.Held(prev.GetState()) {
			return nil
		}
		return &eventv1.Decision{State: eventv1.State_STATE_RECOVERING, Reason: "operator: " + reason, DecidedBy: "operator:" + actorName}
	}
}

// reenable replays what a destination parked while it was disabled: a
// destination in force (not paused or quarantined: those keep their hold
// until resumed) goes to RECOVERING, so the routers replay its parked
// backlog and the monitor marks it HEALTHY once drained. Without it, that
// backlog had no way out but the export window's end (F4).
func reenable(actorName string) func(*eventv1.Decision) *eventv1.Decision {
	return func(prev *eventv1.Decision) *eventv1.Decision {
		if s := prev.GetState(); registry.Held(s) || s == eventv1.State_STATE_RECOVERING {
			return nil
		}
		return &eventv1.Decision{State: eventv1.State_STATE_RECOVERING, Reason: "operator: re-enabled; replaying what was parked", DecidedBy: "operator:" + actorName}
	}
}

// PauseDestination parks a destination's traffic until an operator resumes it.
func (s *Server) PauseDestination(ctx context.Context, req *adminv1.PauseDestinationRequest) (*adminv1.PauseDestinationResponse, error) {
	d, _, err := s.load(ctx, req.GetId())
	if err != nil {
		return nil, err
	}
	dec, err := s.decide(ctx, d, pause(actor(ctx), req.GetReason()))
	if err != nil {
		return nil, err
	}
	s.record(ctx, "PauseDestination", d.GetTenantId(), []string{d.GetId()}, req.GetReason(), "", false)
	return &adminv1.PauseDestinationResponse{Decision: dec}, nil
}

// ResumeDestination lifts a pause or quarantine.
func (s *Server) ResumeDestination(ctx context.Context, req *adminv1.ResumeDestinationRequest) (*adminv1.ResumeDestinationResponse, error) {
	d, _, err := s.load(ctx, req.GetId())
	if err != nil {
		return nil, err
	}
	dec, err := s.decide(ctx, d, resume(actor(ctx), req.GetReason()))
	if err != nil {
		return nil, err
	}
	s.record(ctx, "ResumeDestination", d.GetTenantId(), []string{d.GetId()}, req.GetReason(), "", false)
	return &adminv1.ResumeDestinationResponse{Decision: dec}, nil
}
