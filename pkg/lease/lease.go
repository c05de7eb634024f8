// Package lease elects one holder of a named lease among replicas, using a
// key in a JetStream KV bucket whose entries expire (the bucket's TTL).
package lease

import (
	"context"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/bulkhead-io/bulkhead/pkg/lifecycle"
)

// Run competes for key in kv as holder until ctx ends. It calls onChange(true)
// when this holder gains the lease and onChange(false) when it loses it
// (including at the end, if it held it). Every renew interval the holder
// refreshes the key with a compare-and-set on its revision; a holder that
// cannot refresh gives the lease up at once, so two holders never overlap by
// more than one renew interval. renew must be well under the bucket's TTL
// (a third of it): a holder that dies is replaced within about the TTL.
func Run(ctx context.Context, kv jetstream.KeyValue, key, holder string, renew time.Duration, log *slog.Logger, onChange func(held bool)) {
	var rev uint64
	held := false
	set := func(h bool) {
		if h != held {
			held = h
			log.Info("lease", "key", key, "holder", holder, "held", h)
			onChange(h)
		}
	}
	t := time.NewTicker(renew)
	defer t.Stop()
	for {
		actx, cancel := context.WithTimeout(ctx, renew)
		var err error
		if held {
			rev, err = kv.Update(actx, key, []byte(holder), rev)
			if err != nil {
				log.Warn("lease lost", "key", key, "err", err)
				set(false)
			}
		} else {
			rev, err = kv.Create(actx, key, []byte(holder))
			if err == nil {
				set(true)
			}
		}
		cancel()
		select {
		case <-ctx.Done():
			if held {
				// Give the lease up so a successor need not wait for the TTL.
				dctx, cancel := context.WithTimeout(context.Background(), time.Second)
				_ = kv.Delete(dctx, key, jetstream.LastRevision(rev))
				cancel()
				set(false)
			}
			return
		case <-t.C:
		}
	}
}

// Elector competes for a lease in the background and reports leadership as
// a subscription: Changes carries the latest state, never blocking the
// renew loop, and is closed once the elector has stopped (the lease given
// up). Consumers act on each value they read.
type Elector struct {
	changes chan bool
	handle  *lifecycle.Handle
}

// Elect starts competing for key in kv as holder (see Run) until Stop or ctx
// ends.
func Elect(ctx context.Context, kv jetstream.KeyValue, key, holder string, renew time.Duration, log *slog.Logger) *Elector {
	e := &Elector{changes: make(chan bool, 1)}
	e.handle = lifecycle.Start(ctx, func(ctx context.Context) error {
		defer close(e.changes)
		Run(ctx, kv, key, holder, renew, log, func(held bool) {
			// Keep only the latest state: a reader that fell behind sees
			// where leadership is now, not every step on the way.
			select {
			case <-e.changes:
			default:
			}
			e.changes <- held
		})
		return nil
	})
	return e
}

// Changes delivers true when the lease is gained and false when it is lost;
// it is closed when the elector stops.
func (e *Elector) Changes() <-chan bool { return e.changes }

// Stop gives the lease up (if held) and returns once the elector has stopped.
func (e *Elector) Stop() { _ = e.handle.Stop() }
