// Package registry keeps an in-memory view of the KV buckets "destinations"
// and "quarantine", updated by KV watches, so the data plane looks up a
// destination or a decision without a round trip and a new decision is
// enforced within a second. It also encodes and stores their values.
package registry

import (
	"context"
	"log/slog"
	"sort"
	"sync"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"

	"github.com/bulkhead-io/bulkhead/pkg/codec"
	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/lifecycle"
)

// Encode returns the KV value of m (package codec: protojson, so an operator
// can read it with `nats kv get`).
func Encode(m proto.Message) ([]byte, error) { return codec.Encode(m) }

// Decode parses a KV value into m.
func Decode(b []byte, m proto.Message) error { return codec.Decode(b, m) }

// Kind says which bucket a change came from.
type Kind int

// The kinds of change.
const (
	DestinationChanged Kind = iota + 1
	DecisionChanged
)

// Change is one update seen by the watch. Deleted is true when the key was
// removed; otherwise Destination or Decision holds the new value.
type Change struct {
	Kind        Kind
	ID          string
	Deleted     bool
	Destination *adminv1.Destination
	Decision    *eventv1.Decision
}

// Registry is the in-memory view. Its methods are safe for concurrent use.
// Values returned must not be modified.
type Registry struct {
	js  jetstream.JetStream
	log *slog.Logger
	cur *current

	mu        sync.RWMutex
	dests     map[string]*adminv1.Destination
	byTenant  map[string][]*adminv1.Destination
	decisions map[string]*eventv1.Decision
	subs      map[*Subscription]struct{}

	watches [2]*watch // by kind - 1
	group   lifecycle.Group
	stop    context.CancelFunc
}

// Open loads both buckets and keeps the view current until Stop. It
// returns once the current values are loaded; ctx bounds only that load.
// A watch that ends (a NATS node restart, a bucket re-created) is started
// again and the view resynchronised, so the view never freezes.
func Open(ctx context.Context, js jetstream.JetStream, log *slog.Logger) (*Registry, error) {
	r := &Registry{
		js: js, log: log,
		dests:     map[string]*adminv1.Destination{},
		byTenant:  map[string][]*adminv1.Destination{},
		decisions: map[string]*eventv1.Decision{},
		subs:      map[*Subscription]struct{}{},
	}
	for _, kind := range []Kind{DestinationChanged, DecisionChanged} {
		w, err := newWatch(ctx, js, kind)
		if err != nil {
			return nil, err
		}
		r.watches[kind-1] = w
	}
	r.cur = newCurrent(js, r.watches[DestinationChanged-1].stream)
	r.cur.group = &r.group
	wctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	r.stop = stop
	for _, w := range r.watches {
		watcher, err := r.load(ctx, wctx, w)
		if err != nil {
			stop()
			return nil, err
		}
		w.watcher = watcher
	}
	for _, w := range r.watches {
		r.group.Go(func() { r.follow(wctx, w) })
	}
	r.group.Go(func() { lifecycle.Every(wctx, freshnessInterval, r.checkFresh) })
	return r, nil
}

// Stop ends the watches and waits for them. The view keeps its last values.
func (r *Registry) Stop() {
	r.stop()
	r.group.Stop()
}

// change applies c to the view and queues it for every subscription, under
// one lock, so a subscription's snapshot and its changes never overlap or
// leave a gap.
func (r *Registry) change(kind Kind, c Change) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch kind {
	case DestinationChanged:
		r.setDestination(c.ID, c.Destination)
	case DecisionChanged:
		if c.Deleted {
			delete(r.decisions, c.ID)
		} else {
			r.decisions[c.ID] = c.Decision
		}
	}
	for s := range r.subs {
		s.push(c)
	}
}

// keys returns the ids the view holds for kind.
func (r *Registry) keys(kind Kind) []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	var out []string
	if kind == DestinationChanged {
		for id := range r.dests {
			out = append(out, id)
		}
	} else {
		for id := range r.decisions {
			out = append(out, id)
		}
	}
	return out
}

// setDestination replaces (d nil: removes) a destination. r.mu must be held.
func (r *Registry) setDestination(id string, d *adminv1.Destination) {
	if old, ok := r.dests[id]; ok {
		list := r.byTenant[old.GetTenantId()]
		for i, x := range list {
			if x.GetId() == id {
				list = append(list[:i:i], list[i+1:]...)
				break
			}
		}
		if len(list) == 0 {
			delete(r.byTenant, old.GetTenantId())
		} else {
			r.byTenant[old.GetTenantId()] = list
		}
		delete(r.dests, id)
	}
	if d != nil {
		r.dests[id] = d
		r.byTenant[d.GetTenantId()] = append(r.byTenant[d.GetTenantId()], d)
	}
}

// Destination returns a destination, or nil.
func (r *Registry) Destination(id string) *adminv1.Destination {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.dests[id]
}

// ForTenant returns the tenant's destinations. The slice must not be modified.
func (r *Registry) ForTenant(tenant string) []*adminv1.Destination {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.byTenant[tenant]
}

// Destinations returns every destination ordered by id.
func (r *Registry) Destinations() []*adminv1.Destination {
	r.mu.RLock()
	out := make([]*adminv1.Destination, 0, len(r.dests))
	for _, d := range r.dests {
		out = append(out, d)
	}
	r.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool { return out[i].GetId() < out[j].GetId() })
	return out
}

// Decision returns the decision in force for a destination, or nil (healthy).
func (r *Registry) Decision(id string) *eventv1.Decision {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.decisions[id]
}

// State is the destination's state; HEALTHY when nothing was decided.
func (r *Registry) State(id string) eventv1.State {
	if d := r.Decision(id); d != nil && d.GetState() != eventv1.State_STATE_UNSPECIFIED {
		return d.GetState()
	}
	return eventv1.State_STATE_HEALTHY
}
