package registry

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// CurrentTimeout bounds how long AwaitCurrent waits for the watch to reach
// the bucket's last sequence before it accepts the view as it is.
const CurrentTimeout = 2 * time.Second

// current makes the destinations view read-your-writes for the data plane:
// a batch accepted after CreateDestination returned must be routed to the
// new destination even if the watch has not delivered it yet. It compares the
// last revision the watch applied with the bucket's last sequence, asked of
// the stream leader, and shares one check among every caller that can use it.
type current struct {
	stream jetstream.Stream // the destinations bucket's stream

	mu      sync.Mutex
	applied uint64        // highest revision the watch has applied
	grew    chan struct{} // closed (and replaced) when applied grows
	asOf    time.Time     // start of the last check that succeeded
	check   *check        // in flight, or nil
	gaveUp  uint64        // last sequence a check timed out waiting for
}

// check is one comparison; callers that arrive while it runs wait for it.
type check struct {
	start time.Time
	done  chan struct{}
	err   error
}

func newCurrent(s jetstream.Stream) *current {
	return &current{stream: s, grew: make(chan struct{})}
}

// apply records that the watch applied a revision.
func (c *current) apply(rev uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if rev > c.applied {
		c.applied = rev
		close(c.grew)
		c.grew = make(chan struct{})
	}
}

// AwaitCurrent returns once the view holds every destination change that was
// stored before since (a local time, e.g. when a batch was received). One
// stream-info request serves every caller waiting at the same time, so under
// load the cost is about one round trip per wave of batches.
//
// If the watch does not reach the bucket's last sequence within
// CurrentTimeout it returns an error, and accepts that sequence without
// waiting the next time: the last message may have been removed outside the
// KV API (then no watch will ever deliver it) and routing must not stall.
func (r *Registry) AwaitCurrent(ctx context.Context, since time.Time) error {
	c := r.cur
	for {
		c.mu.Lock()
		if !c.asOf.Before(since) {
			c.mu.Unlock()
			return nil
		}
		ch := c.check
		if ch == nil {
			ch = &check{start: time.Now(), done: make(chan struct{})}
			c.check = ch
			go c.run(ch)
		}
		c.mu.Unlock()
		select {
		case <-ch.done:
			if ch.err != nil {
				return ch.err
			}
			// Loop: a check that started before since does not cover it.
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (c *current) run(ch *check) {
	ctx, cancel := context.WithTimeout(context.Background(), CurrentTimeout)
	defer cancel()
	ch.err = c.reach(ctx)
	c.mu.Lock()
	if ch.err == nil && ch.start.After(c.asOf) {
		c.asOf = ch.start
	}
	c.check = nil
	c.mu.Unlock()
	close(ch.done)
}

// reach waits until the watch has applied the bucket's last sequence.
func (c *current) reach(ctx context.Context) error {
	info, err := c.stream.Info(ctx)
	if err != nil {
		return fmt.Errorf("destinations bucket: %w", err)
	}
	last := info.State.LastSeq
	for {
		c.mu.Lock()
		applied, grew, gaveUp := c.applied, c.grew, c.gaveUp
		if applied >= last || last == gaveUp {
			c.mu.Unlock()
			return nil
		}
		c.mu.Unlock()
		select {
		case <-grew:
		case <-ctx.Done():
			c.mu.Lock()
			c.gaveUp = last
			c.mu.Unlock()
			return fmt.Errorf("destinations view behind: watch applied revision %d, bucket is at %d", applied, last)
		}
	}
}
