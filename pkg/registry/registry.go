// Package registry keeps an in-memory view of the KV buckets "destinations"
// and "quarantine", updated by KV watches, so the data plane looks up a
// destination or a decision without a round trip and a new decision is
// enforced within a second. It also encodes and stores their values.
package registry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/subject"
)

// KV values are protojson, so an operator can read them with `nats kv get`.
var (
	marshal   = protojson.MarshalOptions{UseProtoNames: true}
	unmarshal = protojson.UnmarshalOptions{DiscardUnknown: true}
)

// Encode returns the KV value of m.
func Encode(m proto.Message) ([]byte, error) { return marshal.Marshal(m) }

// Decode parses a KV value into m.
func Decode(b []byte, m proto.Message) error { return unmarshal.Unmarshal(b, m) }

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
	mu        sync.RWMutex
	dests     map[string]*adminv1.Destination
	byTenant  map[string][]*adminv1.Destination
	decisions map[string]*eventv1.Decision
	cur       *current
}

// Watch loads both buckets and keeps the view current until ctx ends. It
// returns once the current values are loaded. onChange, when not nil, is
// called for every change after the initial load (and for every value of the
// initial load too, so a consumer can build its own state the same way),
// from the watch goroutine, in order.
func Watch(ctx context.Context, js jetstream.JetStream, log *slog.Logger, onChange func(Change)) (*Registry, error) {
	r := &Registry{
		dests:     map[string]*adminv1.Destination{},
		byTenant:  map[string][]*adminv1.Destination{},
		decisions: map[string]*eventv1.Decision{},
	}
	destKV, err := js.KeyValue(ctx, subject.BucketDestinations)
	if err != nil {
		return nil, fmt.Errorf("bucket %s: %w", subject.BucketDestinations, err)
	}
	decKV, err := js.KeyValue(ctx, subject.BucketQuarantine)
	if err != nil {
		return nil, fmt.Errorf("bucket %s: %w", subject.BucketQuarantine, err)
	}
	// The bucket's last sequence before the watch starts: the initial values
	// cover it even when its message is gone (a purged stream).
	destStream, err := js.Stream(ctx, "KV_"+subject.BucketDestinations)
	if err != nil {
		return nil, fmt.Errorf("bucket %s: %w", subject.BucketDestinations, err)
	}
	r.cur = newCurrent(js, destStream)
	loaded := destStream.CachedInfo().State.LastSeq
	for _, w := range []struct {
		kv   jetstream.KeyValue
		kind Kind
	}{{destKV, DestinationChanged}, {decKV, DecisionChanged}} {
		watcher, err := w.kv.WatchAll(ctx)
		if err != nil {
			return nil, fmt.Errorf("watch %s: %w", w.kv.Bucket(), err)
		}
		// The initial values end with a nil entry; wait for it so callers
		// start with a complete view.
		for e := range watcher.Updates() {
			if e == nil {
				break
			}
			r.apply(w.kind, e, log, onChange)
		}
		if w.kind == DestinationChanged {
			r.cur.apply(loaded)
		}
		go func(watcher jetstream.KeyWatcher, kind Kind) {
			defer func() { _ = watcher.Stop() }()
			for {
				select {
				case <-ctx.Done():
					return
				case e, ok := <-watcher.Updates():
					if !ok {
						return
					}
					if e != nil {
						r.apply(kind, e, log, onChange)
					}
				}
			}
		}(watcher, w.kind)
	}
	return r, nil
}

func (r *Registry) apply(kind Kind, e jetstream.KeyValueEntry, log *slog.Logger, onChange func(Change)) {
	if kind == DestinationChanged {
		// Counted even when the value is ignored below: the view is as
		// current as the watch, whatever the value held.
		defer r.cur.apply(e.Revision())
	}
	deleted := e.Operation() != jetstream.KeyValuePut
	c := Change{Kind: kind, ID: e.Key(), Deleted: deleted}
	switch kind {
	case DestinationChanged:
		var d adminv1.Destination
		if !deleted {
			if err := Decode(e.Value(), &d); err != nil {
				log.Error("bad destination value; ignored", "key", e.Key(), "err", err)
				return
			}
			c.Destination = &d
		}
		r.setDestination(e.Key(), c.Destination)
	case DecisionChanged:
		var d eventv1.Decision
		if !deleted {
			if err := Decode(e.Value(), &d); err != nil {
				log.Error("bad decision value; ignored", "key", e.Key(), "err", err)
				return
			}
			c.Decision = &d
		}
		r.mu.Lock()
		if deleted {
			delete(r.decisions, e.Key())
		} else {
			r.decisions[e.Key()] = c.Decision
		}
		r.mu.Unlock()
	}
	if onChange != nil {
		onChange(c)
	}
}

func (r *Registry) setDestination(id string, d *adminv1.Destination) {
	r.mu.Lock()
	defer r.mu.Unlock()
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

// Held reports whether traffic for a destination must be parked instead of
// delivered: it is quarantined, being probed or paused.
func Held(s eventv1.State) bool {
	switch s {
	case eventv1.State_STATE_QUARANTINED, eventv1.State_STATE_PROBING, eventv1.State_STATE_PAUSED:
		return true
	}
	return false
}

// ErrConflict is returned by PutDecision when the stored revision is not the
// one the caller read: someone else decided in between.
var ErrConflict = errors.New("decision changed concurrently")

// PutDecision stores d under its destination id if the key's KV revision is
// still lastRev (0: the key must not exist). It returns the new KV revision.
func PutDecision(ctx context.Context, kv jetstream.KeyValue, d *eventv1.Decision, lastRev uint64) (uint64, error) {
	if err := subject.CheckID(d.GetDestinationId()); err != nil {
		return 0, err
	}
	b, err := Encode(d)
	if err != nil {
		return 0, err
	}
	var rev uint64
	if lastRev == 0 {
		rev, err = kv.Create(ctx, d.GetDestinationId(), b)
	} else {
		rev, err = kv.Update(ctx, d.GetDestinationId(), b, lastRev)
	}
	if errors.Is(err, jetstream.ErrKeyExists) {
		return 0, ErrConflict
	}
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence {
		return 0, ErrConflict
	}
	return rev, err
}
