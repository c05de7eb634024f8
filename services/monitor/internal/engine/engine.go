// Package engine runs the health monitor: it feeds delivery outcomes to the
// health state machine, and — on the one replica holding the "monitor" lease —
// stores and audits its decisions, probes quarantined destinations and marks
// recovered ones healthy once their parked backlog has drained.
package engine

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/bulkhead-io/bulkhead/pkg/admission"
	"github.com/bulkhead-io/bulkhead/pkg/lease"
	"github.com/bulkhead-io/bulkhead/pkg/lifecycle"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/bulkhead-io/bulkhead/pkg/webhook"
	"github.com/bulkhead-io/bulkhead/services/monitor/internal/budget"
	"github.com/bulkhead-io/bulkhead/services/monitor/internal/health"
	"github.com/bulkhead-io/bulkhead/services/monitor/internal/stall"
)

// Config tunes the engine.
type Config struct {
	// Policy decides quarantine and probing.
	Policy health.Policy
	// Holder names this replica in the leadership lease.
	Holder string
	// Disabled turns automatic quarantine off: outcomes still feed the
	// statistics, operators can still pause. For experiments only.
	Disabled bool
	// StallAfter is how long a destination's DELIVERY backlog may go without
	// moving before it is reported stalled (see package stall); a
	// destination's patience is at least three request timeouts.
	StallAfter time.Duration
	// BacklogInterval is how often DELIVERY's backlog is read; 5 s when zero.
	BacklogInterval time.Duration
	// ParkedInterval is how often PARKED is summarised for the parked-age
	// gauges; 30 s when zero.
	ParkedInterval time.Duration
	// Budgets are the shares counted here (package budget); the leader
	// refuses a tenant at ingest once one is spent.
	Budgets budget.Limits
}

// Engine is the monitor's decision loop.
type Engine struct {
	js      jetstream.JetStream
	kv      jetstream.KeyValue
	leases  jetstream.KeyValue
	client  *webhook.Client
	cfg     Config
	log     *slog.Logger
	metrics *metrics
	reg     *registry.Registry

	// admission is the view of the refusals; admissionKV stores them.
	admission   *admission.View
	admissionKV jetstream.KeyValue

	statsMu sync.Mutex
	shares  *shares // the last read of the shared streams
	windows map[string]*health.Window
	stalls  *stall.Tracker

	// parkedSeen is the last PARKED summary, to delete the gauges of
	// destinations whose parked data is gone. Only the watchParked loop
	// (one goroutine) touches it.
	parkedSeen map[string]parked.Backlog

	mu      sync.Mutex
	machine *health.Machine // non-nil only while this replica leads
}

// New returns an engine judging the destinations of view; call Run.
func New(ctx context.Context, js jetstream.JetStream, view *registry.Registry, refusals *admission.View, client *webhook.Client, cfg Config, log *slog.Logger, reg prometheus.Registerer) (*Engine, error) {
	if err := cfg.Policy.Validate(); err != nil {
		return nil, err
	}
	kv, err := js.KeyValue(ctx, topology.BucketQuarantine)
	if err != nil {
		return nil, err
	}
	leases, err := js.KeyValue(ctx, topology.BucketLeases)
	if err != nil {
		return nil, err
	}
	admissionKV, err := js.KeyValue(ctx, topology.BucketAdmission)
	if err != nil {
		return nil, err
	}
	if cfg.StallAfter <= 0 {
		cfg.StallAfter = DefaultStallAfter
	}
	if cfg.BacklogInterval <= 0 {
		cfg.BacklogInterval = 5 * time.Second
	}
	if cfg.ParkedInterval <= 0 {
		cfg.ParkedInterval = 30 * time.Second
	}
	stalls, err := stall.New(cfg.StallAfter)
	if err != nil {
		return nil, err
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	return &Engine{js: js, kv: kv, leases: leases, client: client, cfg: cfg, log: log, metrics: m, reg: view,
		admission: refusals, admissionKV: admissionKV,
		windows: map[string]*health.Window{}, stalls: stalls}, nil
}

// onChange applies one registry change. Every replica forgets the
// statistics of a deleted destination; on the leader, decisions stored by
// someone else (an operator through the admin API, a previous leader) are
// loaded into the machine, and its own come back with a revision it already
// has and are ignored.
func (e *Engine) onChange(c registry.Change) {
	if c.Kind == registry.DestinationChanged && c.Deleted {
		e.statsMu.Lock()
		delete(e.windows, c.ID)
		e.stalls.Forget(c.ID)
		e.statsMu.Unlock()
	}
	m := e.leading()
	if m == nil {
		return
	}
	switch {
	case c.Kind == registry.DecisionChanged && !c.Deleted:
		if err := m.Load(c.Decision); err != nil {
			e.log.Warn("load decision", "destination", c.ID, "err", err)
		}
	case c.Kind == registry.DestinationChanged && c.Deleted:
		m.Forget(c.ID)
	case c.Kind == registry.DestinationChanged:
		m.SetDomain(c.ID, c.Destination.GetTenantId(), health.DomainOf(c.Destination.GetUrl()))
	}
}

// Run runs the engine until ctx ends: every replica keeps statistics and
// watches the backlog; the one holding the lease leads. This loop owns the
// leader's loop, starting it when the lease is gained and stopping it (and
// waiting for it) when the lease is lost, so two leader loops never overlap
// within one replica.
func (e *Engine) Run(ctx context.Context) error {
	var g lifecycle.Group
	defer g.Stop()
	g.Go(func() { e.consumeOutcomes(ctx) })
	g.Go(func() { lifecycle.Every(ctx, e.cfg.BacklogInterval, e.watchBacklog) })
	g.Go(func() { lifecycle.Every(ctx, e.cfg.ParkedInterval, e.watchParked) })

	sub := e.reg.Subscribe()
	defer sub.Close()
	elector := lease.Elect(ctx, e.leases, topology.LeaseMonitor, e.cfg.Holder, leaseRenew, e.log)
	defer elector.Stop()
	var leader *lifecycle.Handle
	defer func() {
		if leader != nil {
			_ = leader.Stop()
		}
	}()
	for {
		select {
		case <-sub.Ready():
			for _, c := range sub.Take() {
				e.onChange(c)
			}
		case held, ok := <-elector.Changes():
			switch {
			case held && ok && leader == nil:
				leader = lifecycle.Start(ctx, e.lead)
			case (!held || !ok) && leader != nil:
				_ = leader.Stop()
				leader = nil
			}
			if !ok {
				return nil // the elector stopped: ctx ended
			}
		}
	}
}

// leaseRenew is the lease renewal interval: a third of the leases bucket TTL.
const leaseRenew = 2 * time.Second

// lead runs the leader's loop until ctx ends (the lease is lost or the
// engine stops). It builds a machine from the stored decisions; windows
// start empty: the machine judges only what it sees itself.
func (e *Engine) lead(ctx context.Context) error {
	m, err := health.New(e.cfg.Policy, rand.Float64)
	if err != nil {
		e.log.Error("health machine", "err", err)
		return err
	}
	for _, d := range e.reg.Destinations() {
		m.SetDomain(d.GetId(), d.GetTenantId(), health.DomainOf(d.GetUrl()))
		if dec := e.reg.Decision(d.GetId()); dec != nil {
			if err := m.Load(dec); err != nil {
				e.log.Warn("load decision", "destination", d.GetId(), "err", err)
			}
		}
	}
	e.mu.Lock()
	e.machine = m
	e.mu.Unlock()
	e.metrics.leader.Set(1)
	defer func() {
		e.mu.Lock()
		e.machine = nil
		e.mu.Unlock()
		e.metrics.leader.Set(0)
	}()
	e.tick(ctx, m)
	return nil
}

// leading returns the machine when this replica leads.
func (e *Engine) leading() *health.Machine {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.machine
}
