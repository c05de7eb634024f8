package health

import (
	"cmp"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// ErrUnknownDestination is returned for a destination the Machine does not
// track.
var ErrUnknownDestination = errors.New("unknown destination")

// ErrWrongState is returned for a transition the destination's current state
// does not allow, such as a probe result for a destination not PROBING.
var ErrWrongState = errors.New("wrong state for transition")

// ErrInvalidArgument is returned when a required destination id or actor is
// empty, or a decision to load is malformed.
var ErrInvalidArgument = errors.New("invalid argument")

// decidedByPolicy is Decision.decided_by for automatic transitions.
const decidedByPolicy = "policy"

// Machine holds the state of every destination it has heard of and decides
// their transitions:
//
//	HEALTHY ──policy trips──▶ QUARANTINED ──backoff elapsed──▶ PROBING
//	   ▲                           ▲                            │   │
//	   │                           └──probe fails, backoff×2────┘   │
//	   └── Drained ── RECOVERING ◀──────────probe ok────────────────┘
//	PAUSED: set and lifted only by an operator; overrides all of the above.
//
// Every transition returns a new eventv1.Decision whose revision is the
// previous one plus one; the caller stores and publishes it. A destination
// never decided on is HEALTHY at revision 0. Decisions returned are the
// caller's to keep: the Machine holds no reference to them. On RECOVERING and
// HEALTHY decisions, probe_failures is the flap memory described at
// Policy.FlapCooldown, so it survives a failover through Load.
//
// A Machine never reads the clock. It is safe for concurrent use.
type Machine struct {
	policy Policy
	jitter func() float64

	mu      sync.Mutex
	dests   map[string]*destination
	domains map[string]*domain
}

// destination is one destination's window and the decision in force, kept
// as plain values so no caller shares them.
type destination struct {
	id     string
	tenant string
	domain string // failure domain from SetDomain

	win      *Window   // nil until the first outcome
	winSince time.Time // outcomes of attempts finished earlier are ignored

	state     eventv1.State // never STATE_UNSPECIFIED
	reason    string
	decidedBy string
	decDomain string // Decision.domain: the domain a quarantine was made for
	since     time.Time
	nextProbe time.Time
	revision  uint64
	// probeFailures drives the probe backoff. Kept through RECOVERING and
	// HEALTHY as flap memory (see Policy.FlapCooldown).
	probeFailures int32
}

// New returns a Machine applying p, or an error wrapping ErrInvalidPolicy.
// jitter returns values in [0, 1) that spread probe times; nil means
// math/rand/v2's Float64. It is only called with the Machine's lock held, so
// it need not be safe for concurrent use.
func New(p Policy, jitter func() float64) (*Machine, error) {
	if err := p.Validate(); err != nil {
		return nil, fmt.Errorf("new health machine: %w", err)
	}
	if jitter == nil {
		jitter = rand.Float64
	}
	return &Machine{
		policy:  p,
		jitter:  jitter,
		dests:   make(map[string]*destination),
		domains: make(map[string]*domain),
	}, nil
}

// Observe records the outcome of one delivery attempt at now and returns the
// decisions it causes, nil almost always. Only a HEALTHY or RECOVERING
// destination is quarantined; for the others the outcome only feeds the
// statistics. When the trip completes a failure domain's quota, the decisions
// for the rest of the domain follow the first one, ordered by destination;
// while the domain stays tripped, a HEALTHY member's first failure (429s and
// permanent 4xx excepted) quarantines it at once.
//
// The attempt's time is o.At, or now when o.At is unset or later than now.
// Outcomes older than the window, or finished before the destination
// recovered or was resumed, are ignored, as are probe outcomes (report those
// with ProbeResult) and outcomes without a destination.
func (m *Machine) Observe(o *eventv1.Outcome, now time.Time) []*eventv1.Decision {
	id := o.GetDestinationId()
	if id == "" || o.GetProbe() {
		return nil
	}
	at := now
	if ts := o.GetAt(); ts != nil {
		if t := ts.AsTime(); t.Before(now) {
			at = t
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	d := m.dest(id)
	if d.tenant == "" {
		d.tenant = o.GetTenantId()
	}
	if at.Before(d.winSince) || now.Sub(at) > m.policy.Window {
		return nil
	}
	if d.win == nil {
		d.win = newWindow(m.policy.Window, m.policy.Bucket, m.policy.SlowFraction)
	}
	d.win.Add(o, at)
	if (d.state != eventv1.State_STATE_HEALTHY && d.state != eventv1.State_STATE_RECOVERING) ||
		kindOf(classOf(o.GetErrorClass())) == kindSuccess {
		// A success cannot make any rule trip.
		return nil
	}
	if dom, ok := m.heldDomain(d, now); ok && d.state == eventv1.State_STATE_HEALTHY && failureClass(o.GetErrorClass()) {
		reason := fmt.Sprintf("failure domain %s tripped %v ago", d.domain, now.Sub(dom.trippedAt).Round(time.Second))
		return []*eventv1.Decision{m.quarantine(d, reason, d.domain, now)}
	}
	t, ok := m.policy.Check(d.win, now)
	if !ok {
		return nil
	}
	out := []*eventv1.Decision{m.quarantine(d, t.Reason, "", now)}
	return append(out, m.correlate(d, now)...)
}

// Tick makes the transitions that time alone causes and returns their
// decisions, ordered by destination: a QUARANTINED destination whose next
// probe is due goes to PROBING (the caller probes it and reports with
// ProbeResult), and a PROBING one without a result for Policy.ProbeTimeout
// counts as a failed probe. Call it about once a second.
func (m *Machine) Tick(now time.Time) []*eventv1.Decision {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []*eventv1.Decision
	for _, d := range m.dests {
		switch d.state {
		case eventv1.State_STATE_QUARANTINED:
			if !now.Before(d.nextProbe) {
				out = append(out, m.set(d, eventv1.State_STATE_PROBING,
					fmt.Sprintf("probe %d", d.probeFailures+1), decidedByPolicy, d.decDomain, now))
			}
		case eventv1.State_STATE_PROBING:
			if now.Sub(d.since) >= m.policy.ProbeTimeout {
				out = append(out, m.probeFailed(d, fmt.Sprintf("no result within %v", m.policy.ProbeTimeout), now))
			}
		}
	}
	slices.SortFunc(out, func(a, b *eventv1.Decision) int { return cmp.Compare(a.DestinationId, b.DestinationId) })
	return out
}

// ProbeResult reports the probe of a PROBING destination: nil probeErr moves
// it to RECOVERING (the parked backlog replays; call Drained when it is
// empty), an error back to QUARANTINED with one more probe failure and a
// longer backoff. It returns ErrUnknownDestination or ErrWrongState (for
// example when an operator paused the destination while the probe ran).
func (m *Machine) ProbeResult(dest string, probeErr error, now time.Time) (*eventv1.Decision, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, err := m.lookup("probe result", dest, eventv1.State_STATE_PROBING)
	if err != nil {
		return nil, err
	}
	if probeErr != nil {
		return m.probeFailed(d, probeErr.Error(), now), nil
	}
	d.resetWindow(now)
	return m.set(d, eventv1.State_STATE_RECOVERING, "probe succeeded", decidedByPolicy, "", now), nil
}

// Drained reports that a RECOVERING destination's parked backlog has been
// replayed, making it HEALTHY. The probe failures are kept as flap memory for
// Policy.FlapCooldown. It returns ErrUnknownDestination or ErrWrongState.
func (m *Machine) Drained(dest string, now time.Time) (*eventv1.Decision, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, err := m.lookup("drained", dest, eventv1.State_STATE_RECOVERING)
	if err != nil {
		return nil, err
	}
	return m.set(d, eventv1.State_STATE_HEALTHY, "parked backlog drained", decidedByPolicy, "", now), nil
}

// Load seeds the Machine with a stored decision, as read from the KV bucket
// on start or failover. A decision whose revision is not above the one in
// force is ignored, so replaying a watch is harmless. STATE_UNSPECIFIED loads
// as HEALTHY; a QUARANTINED decision without next_probe is due at once; a
// PROBING one is failed by Tick after Policy.ProbeTimeout from its since, as
// its probe died with the monitor that ran it. It returns ErrInvalidArgument
// for a decision without destination or with an unknown state.
func (m *Machine) Load(dec *eventv1.Decision) error {
	id, state := dec.GetDestinationId(), dec.GetState()
	if id == "" {
		return fmt.Errorf("load decision: %w: no destination id", ErrInvalidArgument)
	}
	if _, ok := eventv1.State_name[int32(state)]; !ok {
		return fmt.Errorf("load decision %s: %w: unknown state %d", id, ErrInvalidArgument, state)
	}
	if state == eventv1.State_STATE_UNSPECIFIED {
		state = eventv1.State_STATE_HEALTHY
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if d, ok := m.dests[id]; ok && d.revision >= dec.GetRevision() {
		return nil
	}
	d := m.dest(id)
	if t := dec.GetTenantId(); t != "" {
		d.tenant = t
	}
	d.state = state
	d.reason = dec.GetReason()
	d.decidedBy = dec.GetDecidedBy()
	d.decDomain = dec.GetDomain()
	d.since = asTime(dec.GetSince())
	d.nextProbe = asTime(dec.GetNextProbe())
	d.revision = dec.GetRevision()
	d.probeFailures = max(dec.GetProbeFailures(), 0)
	if state == eventv1.State_STATE_RECOVERING {
		d.resetWindow(d.since)
	}
	return nil
}

// Forget stops tracking a destination, for example once it is deleted.
func (m *Machine) Forget(dest string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if d, ok := m.dests[dest]; ok {
		m.leaveDomain(d)
		delete(m.dests, dest)
	}
}

// Decision returns the decision in force for dest (HEALTHY at revision 0
// when none was made), or ErrUnknownDestination.
func (m *Machine) Decision(dest string) (*eventv1.Decision, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, ok := m.dests[dest]
	if !ok {
		return nil, fmt.Errorf("decision %s: %w", dest, ErrUnknownDestination)
	}
	return d.decision(), nil
}

// dest returns the tracked destination id, tracking it as HEALTHY if
// needed. m.mu must be held.
func (m *Machine) dest(id string) *destination {
	d, ok := m.dests[id]
	if !ok {
		d = &destination{id: id, state: eventv1.State_STATE_HEALTHY}
		m.dests[id] = d
	}
	return d
}

// lookup returns the destination id when it is in state want, or an error
// for op wrapping ErrUnknownDestination or ErrWrongState. m.mu must be held.
func (m *Machine) lookup(op, id string, want eventv1.State) (*destination, error) {
	d, ok := m.dests[id]
	if !ok {
		return nil, fmt.Errorf("%s %s: %w", op, id, ErrUnknownDestination)
	}
	if d.state != want {
		return nil, fmt.Errorf("%s %s: %w: %s, not %s", op, id, ErrWrongState, d.state, want)
	}
	return d, nil
}

// set moves d to state at now and returns the new decision. m.mu must be
// held.
func (m *Machine) set(d *destination, state eventv1.State, reason, by, domainKey string, now time.Time) *eventv1.Decision {
	d.state, d.reason, d.decidedBy, d.decDomain = state, reason, by, domainKey
	d.since = now
	if state != eventv1.State_STATE_QUARANTINED {
		d.nextProbe = time.Time{}
	}
	d.revision++
	return d.decision()
}

// quarantine moves a HEALTHY or RECOVERING d to QUARANTINED. A destination
// tripping while recovering, or within FlapCooldown of becoming healthy
// again, is flapping: its backoff resumes one step past where it was instead
// of restarting. m.mu must be held.
func (m *Machine) quarantine(d *destination, reason, domainKey string, now time.Time) *eventv1.Decision {
	flapping := d.state == eventv1.State_STATE_RECOVERING ||
		(d.revision > 0 && now.Sub(d.since) < m.policy.FlapCooldown)
	if flapping {
		d.probeFailures++
		reason = fmt.Sprintf("%s (again %v after recovery)", reason, now.Sub(d.since).Round(time.Second))
	} else {
		d.probeFailures = 0
	}
	d.nextProbe = now.Add(m.policy.ProbeDelay(d.probeFailures, m.jitter()))
	return m.set(d, eventv1.State_STATE_QUARANTINED, reason, decidedByPolicy, domainKey, now)
}

// probeFailed moves a PROBING d back to QUARANTINED with a longer backoff.
// m.mu must be held.
func (m *Machine) probeFailed(d *destination, why string, now time.Time) *eventv1.Decision {
	d.probeFailures++
	d.nextProbe = now.Add(m.policy.ProbeDelay(d.probeFailures, m.jitter()))
	return m.set(d, eventv1.State_STATE_QUARANTINED, "probe failed: "+why, decidedByPolicy, d.decDomain, now)
}

// resetWindow starts d's window afresh: outcomes of attempts finished
// before since are not evidence about the new state.
func (d *destination) resetWindow(since time.Time) {
	d.winSince = since
	if d.win != nil {
		d.win.Reset()
	}
}

// decision builds the decision in force as a new message.
func (d *destination) decision() *eventv1.Decision {
	dec := &eventv1.Decision{
		DestinationId: d.id,
		TenantId:      d.tenant,
		State:         d.state,
		Reason:        d.reason,
		DecidedBy:     d.decidedBy,
		Revision:      d.revision,
		ProbeFailures: d.probeFailures,
		Domain:        d.decDomain,
	}
	if !d.since.IsZero() {
		dec.Since = timestamppb.New(d.since)
	}
	if d.state == eventv1.State_STATE_QUARANTINED && !d.nextProbe.IsZero() {
		dec.NextProbe = timestamppb.New(d.nextProbe)
	}
	return dec
}

// asTime converts a timestamp, nil being the zero time.
func asTime(ts *timestamppb.Timestamp) time.Time {
	if ts == nil {
		return time.Time{}
	}
	return ts.AsTime()
}
