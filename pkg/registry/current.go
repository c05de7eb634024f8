package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/bulkhead-io/bulkhead/pkg/lifecycle"
)

// ErrStopped is returned by AwaitCurrent once the registry is stopped.
var ErrStopped = errors.New("registry stopped")

// CurrentTimeout bounds one check of AwaitCurrent: the stream-info request
// and the wait for the watch to reach the bucket's last sequence.
const CurrentTimeout = 2 * time.Second

// current makes the destinations view read-your-writes for the data plane:
// a batch accepted after CreateDestination returned must be routed to the
// new destination even if the watch has not delivered it yet. It compares the
// last revision the watch applied with the bucket's last sequence, asked of
// the stream leader, and shares one check among every caller that can use it.
type current struct {
	js      jetstream.JetStream
	stream  jetstream.Stream // the destinations bucket's stream
	timeout time.Duration
	group   *lifecycle.Group // owns the checks; nil runs them unowned (tests)

	mu      sync.Mutex
	applied uint64        // highest revision the watch has applied
	grew    chan struct{} // closed (and replaced) when applied grows
	asOf    time.Time     // start of the last check that succeeded
	check   *check        // in flight, or nil
	gone    uint64        // a last sequence whose message no longer exists
}

// check is one comparison; callers that arrive while it runs wait for it.
type check struct {
	start time.Time
	done  chan struct{}
	err   error
}

func newCurrent(js jetstream.JetStream, s jetstream.Stream) *current {
	return &current{js: js, stream: s, timeout: CurrentTimeout, grew: make(chan struct{})}
}

// reset sets the applied revision after a (re)load of the bucket, which may
// lower it: a re-created bucket starts its revisions again.
func (c *current) reset(rev uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.applied = rev
	close(c.grew)
	c.grew = make(chan struct{})
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
// It returns an error when that cannot be confirmed within CurrentTimeout
// (the bucket does not answer, or the watch is behind): the caller must not
// act on the view and should retry. The one exception is a last sequence
// whose message was removed outside the KV API, which no watch will ever
// deliver: once the stream leader confirms it is gone it is not waited for.
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
			if c.group == nil {
				go c.run(ch)
			} else if !c.group.Go(func() { c.run(ch) }) {
				// The registry is stopped: nothing will make the view current.
				ch.err = ErrStopped
				c.check = nil
				close(ch.done)
			}
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
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
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
		applied, grew, gone := c.applied, c.grew, c.gone
		c.mu.Unlock()
		if applied >= last || last == gone {
			return nil
		}
		select {
		case <-grew:
		case <-ctx.Done():
			behind := fmt.Errorf("destinations view behind: watch applied revision %d, bucket is at %d", applied, last)
			gctx, cancel := context.WithTimeout(context.Background(), c.timeout)
			defer cancel()
			missing, err := c.missing(gctx, last, info.State.FirstSeq)
			if err != nil {
				return fmt.Errorf("%w (and the stream leader did not say whether it exists: %v)", behind, err)
			}
			if !missing {
				return behind
			}
			c.mu.Lock()
			c.gone = last
			c.mu.Unlock()
			return nil
		}
	}
}

// missing asks the stream leader whether the bucket's message seq is gone.
// Not a direct get: any replica answers those, and a lagging one would say
// "not found" for a message that exists.
func (c *current) missing(ctx context.Context, seq, first uint64) (bool, error) {
	if seq < first {
		return true, nil // the stream was purged
	}
	req, err := json.Marshal(struct {
		Seq uint64 `json:"seq"`
	}{seq})
	if err != nil {
		return false, err
	}
	resp, err := c.js.Conn().RequestWithContext(ctx, "$JS.API.STREAM.MSG.GET."+c.stream.CachedInfo().Config.Name, req)
	if err != nil {
		return false, err
	}
	var answer struct {
		Error *jetstream.APIError `json:"error"`
	}
	if err := json.Unmarshal(resp.Data, &answer); err != nil {
		return false, fmt.Errorf("message get answer: %w", err)
	}
	switch {
	case answer.Error == nil:
		return false, nil
	case answer.Error.ErrorCode == jetstream.JSErrCodeMessageNotFound:
		return true, nil
	default:
		return false, errors.New(answer.Error.Error())
	}
}
