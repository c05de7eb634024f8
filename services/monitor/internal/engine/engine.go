// Package engine runs the health monitor: it feeds delivery outcomes to the
// health state machine, and — on the one replica holding the "monitor" lease —
// stores and audits its decisions, probes quarantined destinations and marks
// recovered ones healthy once their parked backlog has drained.
package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"net/url"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/lease"
	"github.com/bulkhead-io/bulkhead/pkg/lifecycle"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/bulkhead-io/bulkhead/pkg/webhook"
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

	statsMu sync.Mutex
	windows map[string]*health.Window
	stalls  *stall.Tracker

	mu      sync.Mutex
	machine *health.Machine // non-nil only while this replica leads
}

// New returns an engine judging the destinations of view; call Run.
func New(ctx context.Context, js jetstream.JetStream, view *registry.Registry, client *webhook.Client, cfg Config, log *slog.Logger, reg prometheus.Registerer) (*Engine, error) {
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
	if cfg.StallAfter <= 0 {
		cfg.StallAfter = DefaultStallAfter
	}
	if cfg.BacklogInterval <= 0 {
		cfg.BacklogInterval = 5 * time.Second
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
		m.SetDomain(c.ID, Domain(c.Destination.GetUrl()))
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
		m.SetDomain(d.GetId(), Domain(d.GetUrl()))
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

// consumeOutcomes reads every outcome (each replica has its own ordered
// consumer, so every replica keeps statistics for the admin API) and, on the
// leader, feeds the machine. A consumer that ends is created again.
func (e *Engine) consumeOutcomes(ctx context.Context) {
	for ctx.Err() == nil {
		cons, err := e.js.OrderedConsumer(ctx, topology.StreamOutcomes, jetstream.OrderedConsumerConfig{
			FilterSubjects: []string{topology.AllOutcomes},
			DeliverPolicy:  jetstream.DeliverNewPolicy,
		})
		if err != nil {
			e.log.Warn("outcomes consumer", "err", err)
			lifecycle.Sleep(ctx, time.Second)
			continue
		}
		it, err := cons.Messages(jetstream.PullExpiry(stream.PullExpiry), jetstream.PullHeartbeat(stream.PullHeartbeat))
		if err != nil {
			e.log.Warn("outcomes", "err", err)
			lifecycle.Sleep(ctx, time.Second)
			continue
		}
		// Stops the iterator when ctx ends; no goroutine per consumer.
		unhook := context.AfterFunc(ctx, it.Stop)
		for {
			msg, err := it.Next()
			if errors.Is(err, jetstream.ErrNoHeartbeat) {
				continue // nats.go pulls again
			}
			if err != nil {
				break
			}
			var o eventv1.Outcome
			if err := proto.Unmarshal(msg.Data(), &o); err != nil {
				continue
			}
			e.observe(ctx, &o)
		}
		it.Stop()
		unhook()
	}
}

func (e *Engine) observe(ctx context.Context, o *eventv1.Outcome) {
	now := time.Now()
	e.statsMu.Lock()
	w := e.windows[o.GetDestinationId()]
	if w == nil {
		var err error
		if w, err = health.NewWindow(e.cfg.Policy.Window, e.cfg.Policy.Bucket, e.cfg.Policy.SlowFraction); err != nil {
			e.statsMu.Unlock()
			return
		}
		e.windows[o.GetDestinationId()] = w
	}
	w.Add(o, now)
	e.stalls.Attempt(o.GetDestinationId(), now)
	e.statsMu.Unlock()
	e.metrics.outcomes.Inc()

	m := e.leading()
	if m == nil || e.cfg.Disabled {
		return
	}
	for _, d := range m.Observe(o, now) {
		e.store(ctx, m, d)
	}
}

// tick makes the time-driven transitions while leading: due probes, probe
// timeouts, and drained recoveries.
func (e *Engine) tick(ctx context.Context, m *health.Machine) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	var probes sync.WaitGroup
	defer probes.Wait()
	lastDrainCheck := time.Time{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := time.Now()
		for _, d := range m.Tick(now) {
			if !e.store(ctx, m, d) {
				continue
			}
			if d.GetState() == eventv1.State_STATE_PROBING {
				probes.Add(1)
				go func() {
					defer probes.Done()
					e.probe(ctx, m, d)
				}()
			}
		}
		if now.Sub(lastDrainCheck) >= time.Second {
			lastDrainCheck = now
			e.checkDrained(ctx, m, now)
		}
	}
}

// checkDrained marks RECOVERING destinations HEALTHY once everything parked
// before their recovery (plus the routers' grace) has been replayed.
func (e *Engine) checkDrained(ctx context.Context, m *health.Machine, now time.Time) {
	for _, dest := range e.reg.Destinations() {
		dec, err := m.Decision(dest.GetId())
		if err != nil || dec.GetState() != eventv1.State_STATE_RECOVERING {
			continue
		}
		since := dec.GetSince().AsTime()
		if now.Sub(since) < parked.ReplayGrace {
			continue
		}
		sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		n, oldest, err := parked.Stats(sctx, e.js, dest.GetId())
		cancel()
		if err != nil {
			continue
		}
		if n > 0 && !oldest.After(since.Add(parked.ReplayGrace)) {
			continue
		}
		if d, err := m.Drained(dest.GetId(), now); err == nil {
			e.store(ctx, m, d)
		}
	}
}

// store writes a decision to KV with compare-and-set and audits it. On a
// conflict (an operator decided in between) the stored decision wins and is
// loaded into the machine. It reports whether d was stored.
func (e *Engine) store(ctx context.Context, m *health.Machine, d *eventv1.Decision) bool {
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	cur, lastRev, err := registry.GetDecision(sctx, e.kv, d.GetDestinationId())
	if err != nil {
		e.log.Error("decision not stored", "destination", d.GetDestinationId(), "err", err)
		return false
	}
	if cur != nil && cur.GetRevision() >= d.GetRevision() {
		_ = m.Load(cur)
		return false
	}
	if dest := e.reg.Destination(d.GetDestinationId()); dest != nil && d.GetTenantId() == "" {
		d.TenantId = dest.GetTenantId()
	}
	switch _, err := registry.StoreDecision(sctx, e.js, e.kv, d, lastRev); {
	case errors.Is(err, registry.ErrAuditLost):
		e.log.Error("decision audit lost", "destination", d.GetDestinationId(), "err", err)
	case err != nil:
		e.log.Warn("decision not stored", "destination", d.GetDestinationId(), "err", err)
		return false
	}
	e.metrics.decisions.WithLabelValues(d.GetState().String()).Inc()
	e.log.Info("decision", "destination", d.GetDestinationId(), "state", d.GetState().String(),
		"reason", d.GetReason(), "revision", d.GetRevision(), "domain", d.GetDomain())
	return true
}

// probe sends one real parked batch (the oldest) to a PROBING destination:
// useful work, and proof the endpoint accepts our traffic. Delivered, the
// batch leaves PARKED. With nothing parked, an empty batch is sent.
func (e *Engine) probe(ctx context.Context, m *health.Machine, d *eventv1.Decision) {
	dest := e.reg.Destination(d.GetDestinationId())
	if dest == nil {
		return
	}
	var first *parked.Msg
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	errFound := errors.New("found")
	_ = parked.Each(pctx, e.js, dest.GetId(), parked.Range{}, 0, func(msg parked.Msg) error {
		first = &msg
		return errFound
	})
	cancel()
	var body []byte
	var err error
	id := "msg_probe_" + fmt.Sprint(time.Now().UnixNano())
	if first != nil {
		body, err = webhook.EncodeBody(first.Batch.GetImpressions())
		id = "msg_probe_" + first.Batch.GetBatchId()
	} else {
		body = []byte("[]")
	}
	var res webhook.Result
	if err == nil {
		res = e.send(ctx, dest, id, body)
		err = res.Err
	}
	e.metrics.probes.WithLabelValues(boolLabel(err == nil)).Inc()
	if err == nil && first != nil {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		if derr := parked.Delete(dctx, e.js, first.Seq); derr != nil {
			e.log.Warn("probe batch delivered but still parked; it will be delivered again", "destination", dest.GetId(), "err", derr)
		}
		cancel()
	}
	e.publishProbeOutcome(ctx, dest, id, res)
	next, perr := m.ProbeResult(dest.GetId(), err, time.Now())
	if perr != nil {
		return // paused or resumed meanwhile
	}
	e.store(ctx, m, next)
}

func (e *Engine) send(ctx context.Context, dest *adminv1.Destination, id string, body []byte) webhook.Result {
	keys, err := webhook.SigningKeys(dest.GetSecret(), dest.GetPreviousSecret(), dest.GetPreviousSecretExpires().AsTime(), time.Now())
	if err != nil {
		return webhook.Result{Err: err, Class: eventv1.ErrorClass_ERROR_CLASS_OTHER}
	}
	return e.client.Send(ctx, webhook.Request{
		URL: dest.GetUrl(), ID: id, Body: body, Gzip: dest.GetGzip(), Secrets: keys,
		Timeout: dest.GetTimeout().AsDuration(), SuccessCodes: dest.GetSuccessCodes(),
	})
}

func (e *Engine) publishProbeOutcome(ctx context.Context, dest *adminv1.Destination, id string, res webhook.Result) {
	subj, err := topology.Outcome(dest.GetId())
	if err != nil {
		return
	}
	o := &eventv1.Outcome{
		DestinationId: dest.GetId(), TenantId: dest.GetTenantId(), WebhookId: id, At: timestamppb.Now(),
		StatusCode: int32(res.Status), ErrorClass: res.Class, LatencyMs: float64(res.Latency.Microseconds()) / 1000,
		TimeoutMs: float64(dest.GetTimeout().AsDuration().Milliseconds()), Attempt: 1, Probe: true,
	}
	if res.Err != nil {
		o.Error = res.Err.Error()
	}
	if b, err := proto.Marshal(o); err == nil {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, _ = e.js.Publish(pctx, subj, b)
		cancel()
	}
}

// Stats returns the window statistics of a destination for the admin API.
func (e *Engine) Stats(id string) *adminv1.DestinationHealth {
	e.statsMu.Lock()
	defer e.statsMu.Unlock()
	w := e.windows[id]
	if w == nil {
		// A destination never attempted can still be stalled.
		if since := e.stalls.Since(id); !since.IsZero() {
			return &adminv1.DestinationHealth{StalledSince: timestamppb.New(since)}
		}
		return nil
	}
	now := time.Now()
	c := w.Counts(now)
	h := &adminv1.DestinationHealth{
		WindowAttempts:      c.Attempts,
		ErrorRate:           c.ErrorRate(),
		ConsecutiveFailures: int32(w.Consecutive(now)),
		LatencyP50Ms:        w.Latency(now, 0.5),
		LatencyP99Ms:        w.Latency(now, 0.99),
		FailuresByClass:     map[string]int64{},
	}
	for cls, n := range c.ByClass {
		if cls != 0 && n > 0 {
			h.FailuresByClass[eventv1.ErrorClass(cls).String()] = n
		}
	}
	if ls := w.LastSuccess(); !ls.IsZero() {
		h.LastSuccess = timestamppb.New(ls)
	}
	if since := e.stalls.Since(id); !since.IsZero() {
		h.StalledSince = timestamppb.New(since)
	}
	return h
}

// Domain names the failure domain of a destination URL: its host name; for an
// IP literal, its /24 (IPv4) or /48 (IPv6) network. Loopback addresses keep
// their port, so local test endpoints are separate domains.
func Domain(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return ""
	}
	host := u.Hostname()
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return "host:" + host
	}
	if ip.IsLoopback() {
		return "local:" + net.JoinHostPort(host, u.Port())
	}
	bits := 24
	if ip.Is6() && !ip.Is4In6() {
		bits = 48
	}
	p, _ := ip.Unmap().Prefix(bits)
	return "net:" + p.String()
}

func boolLabel(ok bool) string {
	if ok {
		return "ok"
	}
	return "failed"
}
