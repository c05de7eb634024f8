package registry

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/lifecycle"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

// freshnessInterval is how often each view is compared with its bucket for
// ViewAge.
const freshnessInterval = 5 * time.Second

// watch is the KV watch of one bucket and what it has applied.
type watch struct {
	kind    Kind
	kv      jetstream.KeyValue
	stream  jetstream.Stream // the bucket's stream, for its last sequence
	watcher jetstream.KeyWatcher

	// resync asks follow to watch again from scratch (the bucket was
	// re-created under a watch that carried on).
	resync chan struct{}

	mu      sync.Mutex
	applied uint64    // highest revision applied
	fresh   time.Time // when the view last held everything in the bucket
	created time.Time // the bucket stream's creation time at the last load
}

func newWatch(ctx context.Context, js jetstream.JetStream, kind Kind) (*watch, error) {
	bucket := topology.BucketDestinations
	if kind == DecisionChanged {
		bucket = topology.BucketQuarantine
	}
	kv, err := js.KeyValue(ctx, bucket)
	if err != nil {
		return nil, fmt.Errorf("bucket %s: %w", bucket, err)
	}
	st, err := js.Stream(ctx, "KV_"+bucket)
	if err != nil {
		return nil, fmt.Errorf("bucket %s: %w", bucket, err)
	}
	return &watch{kind: kind, kv: kv, stream: st, resync: make(chan struct{}, 1)}, nil
}

// load starts a watch of every key that lives as long as life, and applies
// its initial values, waiting for them at most until ctx ends, as one
// resynchronisation: keys the view holds that the bucket no longer has are
// deleted. It returns the watcher, positioned after the initial values.
func (r *Registry) load(ctx, life context.Context, w *watch) (jetstream.KeyWatcher, error) {
	// The bucket's last sequence before the watch starts: the initial
	// values cover it even when its message is gone (a purged stream).
	info, err := w.stream.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("bucket %s: %w", w.kv.Bucket(), err)
	}
	// nats.go stops a watcher when the context it was made with ends.
	watcher, err := w.kv.WatchAll(life)
	if err != nil {
		return nil, fmt.Errorf("watch %s: %w", w.kv.Bucket(), err)
	}
	seen := map[string]bool{}
initial:
	for {
		select {
		case e, ok := <-watcher.Updates():
			if !ok {
				return nil, fmt.Errorf("watch %s: ended during its initial values", w.kv.Bucket())
			}
			if e == nil {
				break initial
			}
			seen[e.Key()] = true
			r.apply(w, e)
		case <-ctx.Done():
			_ = watcher.Stop()
			return nil, fmt.Errorf("watch %s: initial values: %w", w.kv.Bucket(), ctx.Err())
		}
	}
	for _, id := range r.keys(w.kind) {
		if !seen[id] {
			r.change(w.kind, Change{Kind: w.kind, ID: id, Deleted: true})
		}
	}
	w.mu.Lock()
	// Reset, not raise: a re-created bucket starts its revisions again.
	w.applied, w.fresh, w.created = info.State.LastSeq, time.Now(), info.Created
	w.mu.Unlock()
	if w.kind == DestinationChanged {
		r.cur.reset(info.State.LastSeq)
	}
	return watcher, nil
}

// follow applies live changes until ctx ends. When the watch ends by itself
// (nats.go gives up re-creating it: the stream was deleted, a permission
// changed) or checkFresh finds the bucket re-created, it watches again with
// backoff and resynchronises the view.
func (r *Registry) follow(ctx context.Context, w *watch) {
	watcher := w.watcher
	for attempt := 0; ; attempt++ {
		if watcher != nil {
			r.drain(ctx, w, watcher)
			_ = watcher.Stop()
			watcher = nil
			if ctx.Err() != nil {
				return
			}
			r.log.Warn("registry watch ended; watching again", "bucket", w.kv.Bucket())
		}
		if !lifecycle.Sleep(ctx, lifecycle.Backoff(attempt, 100*time.Millisecond, 5*time.Second)) {
			return
		}
		lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		var err error
		watcher, err = r.load(lctx, ctx, w)
		cancel()
		if err != nil {
			r.log.Warn("registry watch", "bucket", w.kv.Bucket(), "err", err)
			continue
		}
		attempt = 0
	}
}

// drain applies the watcher's updates until it closes or ctx ends.
func (r *Registry) drain(ctx context.Context, w *watch, watcher jetstream.KeyWatcher) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.resync:
			return
		case e, ok := <-watcher.Updates():
			if !ok {
				return
			}
			if e != nil {
				r.apply(w, e)
			}
		}
	}
}

// apply decodes one KV entry into the view. An undecodable value is logged
// and ignored; its revision still counts as applied.
func (r *Registry) apply(w *watch, e jetstream.KeyValueEntry) {
	defer w.saw(e.Revision())
	if w.kind == DestinationChanged {
		defer r.cur.apply(e.Revision())
	}
	c := Change{Kind: w.kind, ID: e.Key(), Deleted: e.Operation() != jetstream.KeyValuePut}
	if !c.Deleted {
		var err error
		switch w.kind {
		case DestinationChanged:
			c.Destination = &adminv1.Destination{}
			err = Decode(e.Value(), c.Destination)
		case DecisionChanged:
			c.Decision = &eventv1.Decision{}
			err = Decode(e.Value(), c.Decision)
		}
		if err != nil {
			r.log.Error("bad registry value; ignored", "bucket", w.kv.Bucket(), "key", e.Key(), "err", err)
			return
		}
	}
	r.change(w.kind, c)
}

// saw records that the watch applied revision rev.
func (w *watch) saw(rev uint64) {
	w.mu.Lock()
	w.applied = max(w.applied, rev)
	w.mu.Unlock()
}

// checkFresh compares each view with its bucket: a view that has applied the
// bucket's last sequence is fresh as of now. It is the loop body of the
// freshness check; tests call it directly.
func (r *Registry) checkFresh(ctx context.Context) {
	for _, w := range r.watches {
		start := time.Now()
		cctx, cancel := context.WithTimeout(ctx, freshnessInterval)
		info, err := w.stream.Info(cctx)
		cancel()
		if err != nil {
			continue
		}
		w.mu.Lock()
		recreated := !info.Created.Equal(w.created)
		if w.applied >= info.State.LastSeq && !recreated {
			w.fresh = start
		}
		w.mu.Unlock()
		if recreated {
			// nats.go's watch follows a re-created stream from where it
			// was, so deletes made by the re-creation never arrive.
			r.log.Warn("registry bucket re-created; reloading", "bucket", w.kv.Bucket())
			select {
			case w.resync <- struct{}{}:
			default:
			}
		}
	}
}

// ViewAge is how long ago the view of kind's bucket was last known to hold
// everything stored in it: about freshnessInterval while the watch keeps
// up, growing while it is behind or broken.
func (r *Registry) ViewAge(kind Kind) time.Duration {
	w := r.watches[kind-1]
	w.mu.Lock()
	defer w.mu.Unlock()
	return time.Since(w.fresh)
}
