// Package admission holds which tenants ingest must refuse because one of
// their storage budgets is spent: the monitor decides and stores a refusal
// (eventv1.Refusal) under the tenant's id in the KV bucket "admission", and
// every ingest replica keeps a View of the bucket and refuses those tenants'
// new batches with the refusal's reason. Nothing already accepted is
// touched: a refusal only stops a tenant from adding to what it holds.
package admission

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/bulkhead-io/bulkhead/pkg/codec"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/lifecycle"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

// Domain is the google.rpc.ErrorInfo domain of Bulkhead's refusals.
const Domain = "bulkhead.io"

// The google.rpc.ErrorInfo reasons a refused Submit carries. Each names
// the budget spent; all are retryable once the cause is gone.
const (
	// ReasonRateLimited: the tenant is over its impressions/s at ingest.
	ReasonRateLimited = "TENANT_RATE_LIMITED"
	// ReasonBacklogFull: the tenant's share of IMPRESSIONS (accepted, not
	// yet routed) is full; JetStream refused the batch.
	ReasonBacklogFull = "TENANT_BACKLOG_FULL"
	// ReasonParkedBudget: the tenant's parked batches (or one of its
	// destinations') reached their budget; export, replay or purge them.
	ReasonParkedBudget = "PARKED_BUDGET_EXHAUSTED"
	// ReasonFairShare: a shared stream is nearly full and the tenant holds
	// more than its fair share of it.
	ReasonFairShare = "STORE_FAIR_SHARE_EXCEEDED"
	// ReasonStoreFull: IMPRESSIONS itself is full.
	ReasonStoreFull = "STORE_FULL"
	// ReasonIngestBusy: ingest holds its most request bytes, in all or for
	// the tenant; the call was refused before it was read.
	ReasonIngestBusy = "INGEST_BUSY"
)

// Store puts r under its tenant's key.
func Store(ctx context.Context, kv jetstream.KeyValue, r *eventv1.Refusal) error {
	b, err := codec.Encode(r)
	if err != nil {
		return err
	}
	if _, err := kv.Put(ctx, r.GetTenantId(), b); err != nil {
		return fmt.Errorf("store refusal of %s: %w", r.GetTenantId(), err)
	}
	return nil
}

// Lift deletes the tenant's refusal.
func Lift(ctx context.Context, kv jetstream.KeyValue, tenant string) error {
	if err := kv.Delete(ctx, tenant); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		return fmt.Errorf("lift refusal of %s: %w", tenant, err)
	}
	return nil
}

// View is an in-memory copy of the bucket, kept current by a KV watch that
// is started again whenever it ends. Its methods are safe for concurrent use.
type View struct {
	kv  jetstream.KeyValue
	log *slog.Logger

	mu      sync.RWMutex
	refused map[string]*eventv1.Refusal

	stop  context.CancelFunc
	group lifecycle.Group
}

// Open loads the bucket and follows it until Stop; ctx bounds only the load.
func Open(ctx context.Context, js jetstream.JetStream, log *slog.Logger) (*View, error) {
	kv, err := js.KeyValue(ctx, topology.BucketAdmission)
	if err != nil {
		return nil, fmt.Errorf("bucket %s: %w", topology.BucketAdmission, err)
	}
	v := &View{kv: kv, log: log, refused: map[string]*eventv1.Refusal{}}
	life, stop := context.WithCancel(context.WithoutCancel(ctx))
	v.stop = stop
	w, err := v.load(ctx, life)
	if err != nil {
		stop()
		return nil, err
	}
	v.group.Go(func() { v.follow(life, w) })
	return v, nil
}

// Stop ends the watch and waits for it. The view keeps its last values.
func (v *View) Stop() {
	v.stop()
	v.group.Stop()
}

// Refusal returns the tenant's refusal, or nil when it may submit.
func (v *View) Refusal(tenant string) *eventv1.Refusal {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.refused[tenant]
}

// All returns every refusal, by tenant.
func (v *View) All() map[string]*eventv1.Refusal {
	v.mu.RLock()
	defer v.mu.RUnlock()
	out := make(map[string]*eventv1.Refusal, len(v.refused))
	for t, r := range v.refused {
		out[t] = r
	}
	return out
}

// load watches the bucket for as long as life lasts and replaces the view
// with its current values, waited for until ctx ends.
func (v *View) load(ctx, life context.Context) (jetstream.KeyWatcher, error) {
	w, err := v.kv.WatchAll(life)
	if err != nil {
		return nil, fmt.Errorf("watch %s: %w", topology.BucketAdmission, err)
	}
	now := map[string]*eventv1.Refusal{}
	for {
		select {
		case e, ok := <-w.Updates():
			if !ok {
				return nil, fmt.Errorf("watch %s: ended during its initial values", topology.BucketAdmission)
			}
			if e == nil {
				v.mu.Lock()
				v.refused = now
				v.mu.Unlock()
				return w, nil
			}
			v.apply(now, e)
		case <-ctx.Done():
			_ = w.Stop()
			return nil, fmt.Errorf("watch %s: initial values: %w", topology.BucketAdmission, ctx.Err())
		}
	}
}

// follow applies changes until ctx ends, watching again (and reloading)
// with backoff whenever the watch ends by itself.
func (v *View) follow(ctx context.Context, w jetstream.KeyWatcher) {
	for attempt := 0; ; attempt++ {
		if w != nil {
			v.drain(ctx, w)
			_ = w.Stop()
			w = nil
			if ctx.Err() != nil {
				return
			}
			v.log.Warn("admission watch ended; watching again")
		}
		if !lifecycle.Sleep(ctx, lifecycle.Backoff(attempt, 100*time.Millisecond, 5*time.Second)) {
			return
		}
		lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		var err error
		w, err = v.load(lctx, ctx)
		cancel()
		if err != nil {
			v.log.Warn("admission watch", "err", err)
			continue
		}
		attempt = 0
	}
}

func (v *View) drain(ctx context.Context, w jetstream.KeyWatcher) {
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-w.Updates():
			if !ok {
				return
			}
			if e != nil {
				v.mu.Lock()
				v.apply(v.refused, e)
				v.mu.Unlock()
			}
		}
	}
}

// apply records e in m. An undecodable value is logged and ignored.
func (v *View) apply(m map[string]*eventv1.Refusal, e jetstream.KeyValueEntry) {
	if e.Operation() != jetstream.KeyValuePut {
		delete(m, e.Key())
		return
	}
	r := &eventv1.Refusal{}
	if err := codec.Decode(e.Value(), r); err != nil {
		v.log.Error("bad admission value; ignored", "key", e.Key(), "err", err)
		return
	}
	m[e.Key()] = r
}
