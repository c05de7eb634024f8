package admin

import (
	"context"
	"time"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/types/known/timestamppb"
)

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
	if s.engine != nil {
		if w := s.engine.Stats(d.GetId()); w != nil {
			h = w
		}
		h.Budgets, h.TenantRefusal = s.engine.Budgets(d)
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
