// Package admin serves bulkhead.admin.v1.AdminService: the destination
// registry, destination health, and the operator actions of the runbooks.
// Every mutating call is authorised by role and written to the audit trail.
package admin

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/bulkhead-io/bulkhead/pkg/audit"
	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/grpcserver"
	"github.com/bulkhead-io/bulkhead/pkg/netguard"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/bulkhead-io/bulkhead/pkg/webhook"
)

// Defaults are what the admin API fills in when a caller leaves it unset.
type Defaults struct {
	// Destination fills a destination's unset limits, so what is stored
	// (and shown) is what the deliverer applies.
	Destination registry.DestinationDefaults
	// ReplayRate is ReplayParked's rate when the caller gives none.
	ReplayRate float64
}

// Reporter is what the monitor's engine knows of a destination beyond the
// buckets and streams.
type Reporter interface {
	// Stats returns the sliding-window figures of a destination (attempts,
	// error rate, latency, failures by class, last success, stall), or nil.
	Stats(id string) *adminv1.DestinationHealth
	// Budgets returns the destination's and its tenant's budgets, and the
	// tenant's refusal at ingest, if any.
	Budgets(d *adminv1.Destination) ([]*eventv1.Budget, *eventv1.Refusal)
}

// Server implements adminv1.AdminServiceServer.
type Server struct {
	adminv1.UnimplementedAdminServiceServer
	js        jetstream.JetStream
	dests     jetstream.KeyValue
	decisions jetstream.KeyValue
	policy    *netguard.Policy
	tokens    []Token
	defaults  Defaults
	engine    Reporter
	log       *slog.Logger
}

// New returns the admin server. engine may be nil.
func New(ctx context.Context, js jetstream.JetStream, policy *netguard.Policy, tokens []Token, d Defaults, engine Reporter, log *slog.Logger) (*Server, error) {
	dests, err := js.KeyValue(ctx, topology.BucketDestinations)
	if err != nil {
		return nil, err
	}
	decisions, err := js.KeyValue(ctx, topology.BucketQuarantine)
	if err != nil {
		return nil, err
	}
	return &Server{js: js, dests: dests, decisions: decisions, policy: policy, tokens: tokens, defaults: d, engine: engine, log: log}, nil
}

func constantTimeEqual(a, b string) bool {
	ha, hb := sha256.Sum256([]byte(a)), sha256.Sum256([]byte(b))
	return subtle.ConstantTimeCompare(ha[:], hb[:]) == 1
}

// CreateDestination registers a destination, generating its secret when none is given.
func (s *Server) CreateDestination(ctx context.Context, req *adminv1.CreateDestinationRequest) (*adminv1.CreateDestinationResponse, error) {
	d := proto.Clone(req.GetDestination()).(*adminv1.Destination)
	if err := s.check(d); err != nil {
		return nil, err
	}
	if d.GetSecret() == "" {
		secret, err := webhook.NewSecret()
		if err != nil {
			return nil, toStatus(s.log, "new secret", err)
		}
		d.Secret = secret
	}
	d.PreviousSecret, d.PreviousSecretExpires, d.DisabledReason = "", nil, ""
	d.Created, d.Updated = timestamppb.Now(), timestamppb.Now()
	s.fill(d)
	if err := registry.CreateDestination(ctx, s.dests, d); errors.Is(err, registry.ErrDestinationExists) {
		return nil, toStatus(s.log, "create destination", fmt.Errorf("destination %q: %w", d.GetId(), errExists))
	} else if err != nil {
		return nil, toStatus(s.log, "create destination", err)
	}
	s.record(ctx, "CreateDestination", d.GetTenantId(), []string{d.GetId()}, "", "url "+d.GetUrl(), false)
	return &adminv1.CreateDestinationResponse{Destination: d}, nil
}

// check validates what protovalidate cannot: the URL against the network
// policy, the secret's format.
func (s *Server) check(d *adminv1.Destination) error {
	if d.GetId() == "" || d.GetTenantId() == "" || d.GetUrl() == "" {
		return grpcserver.InvalidArgument("destination", "id, tenant_id and url are required")
	}
	if _, err := s.policy.CheckURL(d.GetUrl()); err != nil {
		return grpcserver.InvalidArgument("destination.url", err.Error())
	}
	if d.GetSecret() != "" {
		if _, err := webhook.ParseSecret(d.GetSecret()); err != nil {
			return grpcserver.InvalidArgument("destination.secret", "want whsec_<base64 of 24-64 random bytes>")
		}
	}
	return nil
}

func (s *Server) fill(d *adminv1.Destination) { s.defaults.Destination.Fill(d) }

// load returns the stored destination and its KV revision.
func (s *Server) load(ctx context.Context, id string) (*adminv1.Destination, uint64, error) {
	e, err := s.dests.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0, toStatus(s.log, "get destination", fmt.Errorf("destination %q: %w", id, errNotFound))
	}
	if err != nil {
		return nil, 0, toStatus(s.log, "get destination", err)
	}
	var d adminv1.Destination
	if err := registry.Decode(e.Value(), &d); err != nil {
		return nil, 0, toStatus(s.log, "decode destination", err)
	}
	return &d, e.Revision(), nil
}

func redact(d *adminv1.Destination) *adminv1.Destination {
	c := proto.Clone(d).(*adminv1.Destination)
	c.Secret, c.PreviousSecret = "", ""
	return c
}

// GetDestination returns a destination without its secrets.
func (s *Server) GetDestination(ctx context.Context, req *adminv1.GetDestinationRequest) (*adminv1.GetDestinationResponse, error) {
	d, _, err := s.load(ctx, req.GetId())
	if err != nil {
		return nil, err
	}
	return &adminv1.GetDestinationResponse{Destination: redact(d)}, nil
}

// ListDestinations lists destinations ordered by id, optionally of one tenant.
func (s *Server) ListDestinations(ctx context.Context, req *adminv1.ListDestinationsRequest) (*adminv1.ListDestinationsResponse, error) {
	all, err := s.all(ctx, req.GetTenantId())
	if err != nil {
		return nil, err
	}
	for i, d := range all {
		all[i] = redact(d)
	}
	return &adminv1.ListDestinationsResponse{Destinations: all}, nil
}

// all reads every destination (of tenant, when given) from KV, ordered by id.
func (s *Server) all(ctx context.Context, tenant string) ([]*adminv1.Destination, error) {
	lister, err := s.dests.ListKeys(ctx)
	if err != nil {
		return nil, toStatus(s.log, "list destinations", err)
	}
	defer func() { _ = lister.Stop() }()
	var ids []string
	for k := range lister.Keys() {
		ids = append(ids, k)
	}
	var out []*adminv1.Destination
	for _, id := range sortStrings(ids) {
		d, _, err := s.load(ctx, id)
		if status.Code(err) == codes.NotFound {
			continue // deleted meanwhile
		}
		if err != nil {
			return nil, err
		}
		if tenant == "" || d.GetTenantId() == tenant {
			out = append(out, d)
		}
	}
	return out, nil
}

// UpdateDestination replaces a destination's settings; id and tenant are fixed.
func (s *Server) UpdateDestination(ctx context.Context, req *adminv1.UpdateDestinationRequest) (*adminv1.UpdateDestinationResponse, error) {
	in := req.GetDestination()
	rotated, reenabled := false, false
	d, err := registry.UpdateDestination(ctx, s.dests, in.GetId(), func(old *adminv1.Destination) (bool, error) {
		if in.GetTenantId() != old.GetTenantId() {
			return false, grpcserver.InvalidArgument("destination.tenant_id", "a destination cannot move to another tenant")
		}
		d := proto.Clone(in).(*adminv1.Destination)
		d.Secret = old.GetSecret()
		if err := s.check(d); err != nil {
			return false, err
		}
		d.PreviousSecret, d.PreviousSecretExpires = old.GetPreviousSecret(), old.GetPreviousSecretExpires()
		d.Created, d.Updated = old.GetCreated(), timestamppb.Now()
		if d.GetEnabled() {
			d.DisabledReason = ""
			reenabled = !old.GetEnabled()
		}
		if in.GetSecret() != "" && in.GetSecret() != old.GetSecret() || req.GetRotateSecret() {
			next := in.GetSecret()
			if next == "" || next == old.GetSecret() {
				var err error
				if next, err = webhook.NewSecret(); err != nil {
					return false, err
				}
			}
			// The old secret keeps signing for a day: receivers verify either.
			d.PreviousSecret, d.PreviousSecretExpires = old.GetSecret(), timestamppb.New(time.Now().Add(24*time.Hour))
			d.Secret = next
			rotated = true
		}
		s.fill(d)
		proto.Reset(old)
		proto.Merge(old, d)
		return true, nil
	})
	switch {
	case errors.Is(err, registry.ErrDestinationNotFound):
		return nil, toStatus(s.log, "update destination", fmt.Errorf("destination %q: %w", in.GetId(), errNotFound))
	case err != nil:
		// A lost compare-and-set is Aborted; a NATS timeout is Unavailable.
		return nil, toStatus(s.log, fmt.Sprintf("update destination %q", in.GetId()), err)
	}
	s.record(ctx, "UpdateDestination", d.GetTenantId(), []string{d.GetId()}, "", fmt.Sprintf("rotated secret: %v", rotated), false)
	if reenabled {
		// The record is stored; a failure here leaves the backlog parked
		// (and exportable) and is the caller's to retry with ResumeDestination.
		if _, err := s.decide(ctx, d, reenable(actor(ctx))); err != nil {
			return nil, err
		}
	}
	if !rotated {
		d = redact(d)
	}
	return &adminv1.UpdateDestinationResponse{Destination: d}, nil
}

// DeleteDestination removes a destination and its decision; parked data stays
// until the export window ends.
func (s *Server) DeleteDestination(ctx context.Context, req *adminv1.DeleteDestinationRequest) (*adminv1.DeleteDestinationResponse, error) {
	d, _, err := s.load(ctx, req.GetId())
	if err != nil {
		return nil, err
	}
	if err := s.dests.Delete(ctx, d.GetId()); err != nil {
		return nil, toStatus(s.log, "delete destination", err)
	}
	if err := s.decisions.Delete(ctx, d.GetId()); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		s.log.Warn("delete decision", "destination", d.GetId(), "err", err)
	}
	s.record(ctx, "DeleteDestination", d.GetTenantId(), []string{d.GetId()}, "", "", false)
	return &adminv1.DeleteDestinationResponse{}, nil
}

// record writes an admin action to the audit trail. A failure to audit is
// logged loudly; the action itself has already happened.
func (s *Server) record(ctx context.Context, action, tenant string, ids []string, reason, detail string, dryRun bool) {
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	err := audit.Admin(actx, s.js, &eventv1.AuditRecord{
		Actor: actor(ctx), Action: action, TenantId: tenant, DestinationIds: ids,
		Reason: reason, Detail: detail, DryRun: dryRun,
	})
	if err != nil {
		s.log.Error("audit record lost", "action", action, "tenant", tenant, "err", err)
	}
}

func formatCount(batches, impressions int64) string {
	if impressions < 0 {
		return fmt.Sprintf("%d batches", batches)
	}
	return fmt.Sprintf("%d batches, %d impressions", batches, impressions)
}
