// Package lease elects one holder of a named lease among replicas, using a
// key in a JetStream KV bucket whose entries expire (the bucket's TTL).
package lease

import (
	"context"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"
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
