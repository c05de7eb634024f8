package admin

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
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

// GetDestinationHealth returns one destination's health.
func (s *Server) GetDestinationHealth(ctx context.Context, req *adminv1.GetDestinationHealthRequest) (*adminv1.GetDestinationHealthResponse, error) {
	d, _, err := s.load(ctx, req.GetId())
	if err != nil {
		return nil, err
	}
	h, err := s.health(ctx, d)
	if err != nil {
		return nil, err
	}
	return &adminv1.GetDestinationHealthResponse{Health: h}, nil
}

// ListDestinationHealth returns the health of a tenant's (or all) destinations.
func (s *Server) ListDestinationHealth(ctx context.Context, req *adminv1.ListDestinationHealthRequest) (*adminv1.ListDestinationHealthResponse, error) {
	dests, err := s.all(ctx, req.GetTenantId())
	if err != nil {
		return nil, err
	}
	resp := &adminv1.ListDestinationHealthResponse{}
	for _, d := range dests {
		h, err := s.health(ctx, d)
		if err != nil {
			return nil, err
		}
		if req.GetState() != eventv1.State_STATE_UNSPECIFIED && h.GetDecision().GetState() != req.GetState() {
			continue
		}
		resp.Health = append(resp.Health, h)
	}
	return resp, nil
}

func (s *Server) health(ctx context.Context, d *adminv1.Destination) (*adminv1.DestinationHealth, error) {
	h := &adminv1.DestinationHealth{}
	if s.stats != nil {
		if w := s.stats(d.GetId()); w != nil {
			h = w
		}
	}
	h.DestinationId, h.TenantId = d.GetId(), d.GetTenantId()
	dec, _, err := s.decision(ctx, d.GetId())
	if err != nil {
		return nil, err
	}
	if dec == nil {
		dec = &eventv1.Decision{DestinationId: d.GetId(), TenantId: d.GetTenantId(), State: eventv1.State_STATE_HEALTHY}
	}
	h.Decision = dec
	n, oldest, err := parked.Stats(ctx, s.js, d.GetId())
	if err != nil {
		return nil, toStatus(s.log, "parked stats", err)
	}
	h.Parked = n
	if !oldest.IsZero() {
		h.OldestParked = timestamppb.New(oldest)
	}
	if h.PendingDelivery, h.InFlight, err = pending(ctx, s.js, d.GetId()); err != nil {
		return nil, toStatus(s.log, "delivery stats", err)
	}
	if h.PendingDelivery > 0 {
		if at, err := oldestUndelivered(ctx, s.js, d.GetId()); err == nil {
			h.OldestUndelivered = timestamppb.New(at)
		}
	}
	return h, nil
}

// oldestUndelivered returns when the first batch of a destination still in
// DELIVERY was stored. DELIVERY is a work queue, so the first message on the
// destination's subject is the oldest one not yet delivered or parked.
func oldestUndelivered(ctx context.Context, js jetstream.JetStream, id string) (time.Time, error) {
	subj, err := topology.Deliver(id)
	if err != nil {
		return time.Time{}, err
	}
	st, err := js.Stream(ctx, topology.StreamDelivery)
	if err != nil {
		return time.Time{}, err
	}
	m, err := st.GetMsg(ctx, st.CachedInfo().State.FirstSeq, jetstream.WithGetMsgSubject(subj))
	if err != nil {
		return time.Time{}, err
	}
	return m.Time, nil
}

// pending counts a destination's batches in DELIVERY, and of those the ones
// deliverers hold (the destination's consumer's unacknowledged messages).
func pending(ctx context.Context, js jetstream.JetStream, id string) (int64, int64, error) {
	subj, err := topology.Deliver(id)
	if err != nil {
		return 0, 0, err
	}
	st, err := js.Stream(ctx, topology.StreamDelivery)
	if err != nil {
		return 0, 0, err
	}
	info, err := st.Info(ctx, jetstream.WithSubjectFilter(subj))
	if err != nil {
		return 0, 0, err
	}
	var held int64
	// The consumer may not exist yet for a destination no deliverer has seen.
	name, _ := topology.DeliverConsumer(id)
	if ci, err := js.Consumer(ctx, topology.StreamDelivery, name); err == nil {
		held = int64(ci.CachedInfo().NumAckPending)
	}
	return int64(info.State.Subjects[subj]), held, nil
}

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

func sortStrings(s []string) []string {
	sort.Strings(s)
	return s
}
